"""The language-model path (grft_vision.llm, train_glue.py) on tiny random models and an offline tokenizer.

Needs transformers and scikit-learn (the ``test`` extra installs them). Every model here is random and
tiny (a 2-layer Llama with hidden size 64, a 2-layer BERT); the tokenizer is a word-level ``tokenizers``
model built in the test. The toy task is learnable: the label says whether the keyword "good" occurs.
"""
from __future__ import annotations

import copy
import json
import re
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import (LlamaConfig, LlamaForSequenceClassification)

from grft_vision import (GRFTConfig, adapter_parameters, apply_grft, load_adapter, merge_grft, save_adapter,
                         trainable_parameters_report)
from grft_vision.tuner.layer import grft_layers
from grft_vision.tuner.targets import find_target_layers
from grft_vision.tuner.model import inject as add_adapter
from grft_vision.data import DataNotFoundError
from grft_vision.llm import (GlueDataset, GlueExample, GlueTrainConfig, PadCollate, SequenceTooLongError,
                             TokenFeatures, final_hidden_state, glue_metrics, last_token_index, load_classifier,
                             load_glue, load_tokenizer, pool_hidden_states, tokenize_dataset)
from grft_vision.llm import cli as glue_cli
from grft_vision.selection.losses import SupConSelectionLoss
from grft_vision.training.config import TrainConfig
from grft_vision.training.runner import create_scheduler

from conftest import crash_then_resume, histories_of_one_and_two_processes
from tiny_llm import KEYWORD, save_tiny, toy_examples, write_glue

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = glue_cli.CONFIG_DIR
TARGETS = ["*layers.*", "*.layer.*"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models run fastest on one thread


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: save_tiny(root / kind, kind) for kind in ("llama", "bert")}


def tokenized(kind: str, folder: Path, examples: list[GlueExample], task: str = "cola"):
    tokenizer = load_tokenizer(str(folder))
    dataset = GlueDataset(task, "train", examples)
    tokenize_dataset(dataset, tokenizer, max_length=32)
    return tokenizer, dataset, PadCollate(tokenizer.pad_token_id, tokenizer.padding_side)


# ------------------------------------------------------------------------------------------------- data

def test_glue_tsv_formats_and_labels(tmp_path):
    write_glue(tmp_path, "cola", {"train": 6, "dev": 4})
    write_glue(tmp_path, "mrpc", {"train": 5, "dev": 3})
    write_glue(tmp_path, "rte", {"train": 5, "dev": 3})
    cola = load_glue("cola", "train", tmp_path)
    assert len(cola) == 6 and cola.source.endswith("CoLA/train.tsv") and len(cola.examples[0].texts) == 1
    assert cola.labels == [int(KEYWORD in e.texts[0].split()) for e in cola.examples]
    mrpc = load_glue("mrpc", "dev", tmp_path)  # the header row is skipped
    assert len(mrpc) == 3 and len(mrpc.examples[0].texts) == 2
    rte = load_glue("rte", "validation", tmp_path, layout="tsv")  # 'validation' finds dev.tsv
    assert len(rte) == 3 and set(rte.labels) <= {0, 1}
    rte_lines = (tmp_path / "RTE" / "dev.tsv").read_text().splitlines()[1:]
    assert [("entailment", "not_entailment")[label] for label in rte.labels] == [l.split("\t")[3] for l in rte_lines]


def test_glue_jsonl(tmp_path):
    rows = [{"sentence1": "a cat", "sentence2": "the dog", "label": "not_entailment", "idx": 0},
            {"sentence1": "a good cat", "sentence2": "the dog", "label": 0, "idx": 1}]
    (tmp_path / "rte").mkdir()
    (tmp_path / "rte" / "dev.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    dataset = load_glue("rte", "dev", tmp_path)
    assert dataset.labels == [1, 0] and dataset.examples[0].texts == ("a cat", "the dog")


@pytest.mark.parametrize("content, split, message", [
    ("index\tsentence\n0\tthe cat\n", "train", "expected 4 tab-separated columns.*test files are unlabelled"),
    ("src\t7\t\tthe cat\n", "train", "label '7' is not one of unacceptable, acceptable"),
    (None, "test", "test sets are unlabelled; evaluate on 'dev'"),
])
def test_glue_file_errors(tmp_path, content, split, message):
    (tmp_path / "CoLA").mkdir()
    if content is not None:
        (tmp_path / "CoLA" / f"{split}.tsv").write_text(content)
    with pytest.raises(ValueError, match=message):
        load_glue("cola", split, tmp_path)


def test_missing_files_say_where_and_how(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"DIR/MRPC/train.tsv.*--data-dir"):
        load_glue("mrpc", "train", tmp_path)


def test_hugging_face_route(monkeypatch):
    calls = []

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        if split == "validation":
            return [{"sentence": "the good cat", "label": 1, "idx": 0}, {"sentence": "a cat", "label": 0, "idx": 1}]
        raise ConnectionError("no network")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    dataset = load_glue("cola", "dev")
    assert calls == [("nyu-mll/glue", "cola", "validation")] and dataset.labels == [1, 0]
    with pytest.raises(DataNotFoundError, match=r"ConnectionError: no network.*--data-dir"):
        load_glue("cola", "train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(DataNotFoundError, match=r"pip install 'grft-vision\[llm\]'.*--data-dir"):
        load_glue("cola", "train")


def test_metrics():
    targets = torch.tensor([1, 1, 0, 0, 1, 0])
    predictions = torch.tensor([1, 0, 0, 1, 1, 0])
    cola = glue_metrics("cola", predictions, targets)
    assert cola["accuracy"] == pytest.approx(4 / 6) and cola["mcc"] == pytest.approx(1 / 3)
    mrpc = glue_metrics("mrpc", predictions, targets)
    assert set(mrpc) == {"accuracy", "f1"} and mrpc["f1"] == pytest.approx(2 / 3)
    assert set(glue_metrics("rte", predictions, targets)) == {"accuracy"}


def test_padding_collate_and_truncation(tiny_dirs):
    tokenizer = load_tokenizer(str(tiny_dirs["llama"]))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"  # Llama: pad with EOS
    dataset = GlueDataset("cola", "train", [GlueExample(("the cat sat on the mat",), 1), GlueExample(("a",), 0)])
    assert tokenize_dataset(dataset, tokenizer, max_length=4) == 1  # one example truncated
    assert len(dataset[0]["input_ids"]) == 4 and dataset[1]["input_ids"] == [tokenizer.bos_token_id,
                                                                             tokenizer.convert_tokens_to_ids("a")]
    for side in ("right", "left"):
        batch = PadCollate(tokenizer.pad_token_id, side)([dataset[0], dataset[1]])
        expected = [[1, 1, 1, 1], [1, 1, 0, 0] if side == "right" else [0, 0, 1, 1]]
        assert batch["attention_mask"].tolist() == expected and batch["index"].tolist() == [0, 1]
        assert last_token_index(batch["attention_mask"]).tolist() == [3, 1 if side == "right" else 3]
    with pytest.raises(SequenceTooLongError, match="example 0 is 7 tokens long.*--max-length"):
        tokenize_dataset(dataset, tokenizer, max_length=4, truncation=False)


# ------------------------------------------------------------------------------------------------- features

@pytest.mark.parametrize("side", ["right", "left"])
def test_pooled_features_are_what_the_llama_head_reads(tiny_dirs, side):
    tokenizer, dataset, _ = tokenized("llama", tiny_dirs["llama"], toy_examples(6, 1))
    model = load_classifier(str(tiny_dirs["llama"]), 2, tokenizer).eval()
    batch = PadCollate(tokenizer.pad_token_id, side)([dataset[i] for i in range(6)])
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padding present
    with torch.no_grad():
        features, labels = TokenFeatures("last")(model, batch, torch.device("cpu"))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(model.score(features), logits)
    assert torch.equal(labels, batch["labels"]) and features.shape == (6, 64)


def test_first_token_features_for_an_encoder(tiny_dirs):
    tokenizer, dataset, collate = tokenized("bert", tiny_dirs["bert"], toy_examples(4, 2, pair=True), "rte")
    model = load_classifier(str(tiny_dirs["bert"]), 2, tokenizer).eval()
    batch = collate([dataset[i] for i in range(4)])
    assert "token_type_ids" in batch and batch["input_ids"][:, 0].eq(tokenizer.cls_token_id).all()
    with torch.no_grad():
        features, _ = TokenFeatures("first")(model, batch, torch.device("cpu"))
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
        logits = model(**inputs).logits
        hidden = final_hidden_state(model, inputs)
    torch.testing.assert_close(features, pool_hidden_states(hidden, batch["attention_mask"], "first"))
    torch.testing.assert_close(model.classifier(model.bert.pooler(hidden)), logits)


def test_batches_supcon_cannot_use_are_completed_deterministically(tiny_dirs):
    examples = toy_examples(40, 3)
    tokenizer, dataset, collate = tokenized("llama", tiny_dirs["llama"], examples)
    model = load_classifier(str(tiny_dirs["llama"]), 2, tokenizer).eval()
    features = TokenFeatures("last", dataset=dataset, collate=collate, seed=0)
    positives = [i for i, e in enumerate(examples) if e.label == 1][:3]
    one_class = collate([dataset[i] for i in positives])
    with pytest.raises(Exception, match="single class"):
        SupConSelectionLoss().check_batch(one_class["labels"], 0)
    completed = features.complete(one_class)
    assert completed["index"][:3].tolist() == positives and completed["labels"].tolist() == [1, 1, 1, 0, 0]
    assert torch.equal(features.complete(one_class)["index"], completed["index"])  # same batch, same completion
    no_pair = collate([dataset[positives[0]], dataset[next(i for i, e in enumerate(examples) if e.label == 0)]])
    assert sorted(features.complete(no_pair)["labels"].tolist()) == [0, 1, 1]
    with torch.no_grad():
        vectors, labels = features(model, one_class, torch.device("cpu"))
    SupConSelectionLoss().check_batch(labels, 0)
    assert vectors.shape == (5, 64)
    two_views = TokenFeatures("last", views=2)(model, completed, torch.device("cpu"))[1]
    assert two_views.tolist() == [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]


# ------------------------------------------------------------------------------------------------- the core path

@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_select_wrap_train_adapter_merge(tiny_dirs, tmp_path, kind):
    folder = tiny_dirs[kind]
    examples = toy_examples(64, 4, pair=kind == "bert")
    task = "cola" if kind == "llama" else "rte"
    tokenizer, dataset, collate = tokenized(kind, folder, examples, task)
    torch.manual_seed(0)
    model = load_classifier(str(folder), 2, tokenizer)
    pooling = "last" if kind == "llama" else "first"
    loader = torch.utils.data.DataLoader(dataset, batch_size=16, collate_fn=collate)
    config = GRFTConfig(structure="row", k=2, selection_views=1, num_subsets=2, target_modules=TARGETS,
                        reg_lambda=1e-4)
    apply_grft(model, config=config, dataloader=loader, progress=False,
               features=TokenFeatures(pooling, dataset=dataset, collate=collate))
    assert model.grft_state.selection.subset_losses and len(model.grft_state.selection.subset_losses) == 2

    wrapped = dict(grft_layers(model))
    linears_per_layer = 7 if kind == "llama" else 6
    assert len(wrapped) == 2 * linears_per_layer
    assert all(".layers." in name or ".layer." in name for name in wrapped)
    trainable = set(adapter_parameters(model, "default"))
    assert {id(p) for p in model.parameters() if p.requires_grad} == {id(p) for p in
                                                                       adapter_parameters(model, "default").values()}
    head = {"score.weight"} if kind == "llama" else {"classifier.weight", "classifier.bias"}
    assert head <= trainable
    biases = {f"{name}.bias_delta" for name, layer in wrapped.items() if layer.base_layer.bias is not None}
    assert trainable == head | {f"{name}.delta" for name in wrapped} | biases
    assert not any("embed" in name or "norm" in name.lower() or "pooler" in name for name in trainable)

    # train: the loss falls on the keyword task
    from grft_vision import L2ToPretrained
    regularizer = L2ToPretrained(model, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    train_loader = torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=True, collate_fn=collate,
                                               generator=torch.Generator().manual_seed(0))
    model.train()
    losses = []
    for _ in range(8):
        for batch in train_loader:
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
            loss = torch.nn.functional.cross_entropy(model(**inputs).logits, batch["labels"]) + regularizer()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.7 * sum(losses[:4]) / 4, losses
    assert all(float(layer.delta.detach().abs().sum()) > 0 for layer in wrapped.values())

    # adapter round trip onto a freshly loaded model, and merging
    model.eval()
    batch = collate([dataset[i] for i in range(8)])
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    with torch.no_grad():
        expected = model(**inputs).logits
    save_adapter(model, tmp_path / "adapter.safetensors")
    fresh = load_adapter(load_classifier(str(folder), 2, tokenizer), tmp_path / "adapter.safetensors").eval()
    merged = merge_grft(copy.deepcopy(model)).eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**inputs).logits, expected)
        torch.testing.assert_close(merged(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    plain = load_classifier(str(folder), 2, tokenizer)
    assert merged.state_dict().keys() == plain.state_dict().keys()
    assert type(merged) is type(plain) and not list(grft_layers(merged))


def test_bf16_weights_keep_head_and_updates_in_fp32(tiny_dirs):
    tokenizer, dataset, collate = tokenized("llama", tiny_dirs["llama"], toy_examples(16, 5))
    model = load_classifier(str(tiny_dirs["llama"]), 2, tokenizer, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert model.score.weight.dtype == torch.float32
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=collate)
    apply_grft(model, config=GRFTConfig(k=1, selection_views=1, target_modules=TARGETS), dataloader=loader,
               features=TokenFeatures("last", dataset=dataset, collate=collate), progress=False)
    assert {layer.delta.dtype for _, layer in grft_layers(model)} == {torch.float32}
    batch = next(iter(loader))
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert logits.dtype == torch.float32
    torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
    assert model.score.weight.grad is not None and model.model.layers[0].mlp.down_proj.delta.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients(tiny_dirs):
    tokenizer, dataset, collate = tokenized("llama", tiny_dirs["llama"], toy_examples(8, 6))
    batch = collate([dataset[i] for i in range(8)])
    gradients = []
    for checkpointing in (False, True):
        model = load_classifier(str(tiny_dirs["llama"]), 2, tokenizer, gradient_checkpointing=checkpointing)
        generator = torch.Generator().manual_seed(0)
        scores = {f"{n}.weight": torch.rand(m.weight.shape, generator=generator)
                  for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        apply_grft(model, scores, GRFTConfig(k=2, target_modules=TARGETS))
        for _, layer in grft_layers(model):
            torch.nn.init.normal_(layer.delta, std=0.05, generator=generator)
        model.train()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
        gradients.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert model.model.gradient_checkpointing
    for name in gradients[0]:
        torch.testing.assert_close(gradients[0][name], gradients[1][name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------- budget, schedule

def test_table_8_budget_of_llama_3_2_1b_is_three_rows():
    """0.08 % of Llama-3.2-1B (paper Table 3 / Table 8, k = 3): rows of every decoder linear + the head."""
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, num_labels=2,
                         tie_word_embeddings=True)  # meta-llama/Llama-3.2-1B's published config.json
    with torch.device("meta"):
        model = LlamaForSequenceClassification(config)
    _, grft, _ = glue_cli.resolve_settings(["--dataset", "rte"], CONFIGS)
    assert (grft.structure, grft.k) == ("row", 3)
    targets = find_target_layers(model, grft)
    assert len(targets) == 16 * 7 and "score" not in targets and not any("embed" in n for n in targets)
    assert sum(p.numel() for p in model.parameters()) == 1_235_814_400 + 2048 * 2  # published size + head
    # which rows are chosen does not change how many train: wrap the first k of every target (on meta tensors)
    add_adapter(model, "default", {name: torch.arange(grft.k) for name in targets}, dict.fromkeys(targets, "row"), grft)
    report = trainable_parameters_report(model)
    assert report.trainable == 987_136 and round(report.percent, 2) == 0.08
    assert set(report.fully_trainable) == {"score.weight"}
    with torch.device("meta"):
        model = LlamaForSequenceClassification(config)
    add_adapter(model, "default", {name: torch.arange(3) for name in targets}, dict.fromkeys(targets, "column"), grft)
    assert round(trainable_parameters_report(model).percent, 2) == 0.09  # columns would be 0.09 %


@pytest.mark.parametrize("task", ["cola", "mrpc", "rte"])
def test_glue_configs(task):
    train, grft, _ = glue_cli.resolve_settings(["--dataset", task], CONFIGS)
    assert isinstance(train, GlueTrainConfig) and train.model == "meta-llama/Llama-3.2-1B"
    assert (train.opt, train.sched, train.sched_on_updates, train.eval_split) == ("adamw", "linear", True, "dev")
    assert (grft.structure, grft.k, grft.selection_views) == ("row", 3, 1) and grft.target_modules == [
        "*layers.*", "*.layer.*", "*.h.*"]


def test_per_update_linear_schedule_with_warmup_ratio():
    train = GlueTrainConfig(lr=1.0, epochs=2, warmup_ratio=0.25, warmup_lr=0.0, min_lr=0.0)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=train.lr)
    scheduler, epochs = create_scheduler(optimizer, train, updates_per_epoch=4)
    assert epochs == 2
    rates = []
    for update in range(1, 9):
        rates.append(optimizer.param_groups[0]["lr"])
        scheduler.step_update(num_updates=update)
    assert rates == pytest.approx([0.0, 0.5, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6])
    scheduler.step(1)  # epoch steps leave a per-update schedule alone
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0)


def test_vision_schedule_is_unchanged():
    from timm.scheduler import create_scheduler_v2

    train = TrainConfig(lr=1.0, epochs=5, warmup_epochs=2)
    rates = []
    for build in (lambda o: create_scheduler(o, train, 3),
                  lambda o: create_scheduler_v2(o, sched="cosine", num_epochs=5, warmup_epochs=2, warmup_lr=1e-7,
                                                min_lr=1e-8, warmup_prefix=True)):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        scheduler, epochs = build(optimizer)
        rates.append([epochs])
        for epoch in range(7):
            scheduler.step_update(num_updates=epoch * 3 + 1)  # a no-op for epoch schedules
            scheduler.step(epoch + 1)
            rates[-1].append(optimizer.param_groups[0]["lr"])
    assert rates[0] == rates[1] and rates[0][0] == 7


# ------------------------------------------------------------------------------------------------- train_glue.py

def glue(*args: str) -> int:
    return glue_cli.main(list(args), CONFIGS)


def tiny_args(model_dir: Path, data_dir: Path, run_dir: Path) -> list[str]:
    return ["--model", str(model_dir), "--data-dir", str(data_dir), "--run-dir", str(run_dir), "--max-length", "32",
            "--batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--quiet", "--set", "selection_batch_size=16"]


def test_train_glue_cli_on_glue_tsv_files(tiny_dirs, tmp_path, capsys):
    data = write_glue(tmp_path / "glue", "cola", {"train": 48, "dev": 16})
    run_dir = tmp_path / "run"
    assert glue("--dataset", "cola", *tiny_args(tiny_dirs["llama"], data, run_dir), "--rows", "2",
                "--reg-lambda", "1e-3") == 0
    assert re.search(r"^dev accuracy \d\.\d{4}  mcc -?\d\.\d{4} \| trainable .* \| selection .* \| ", capsys.readouterr().out,
                     re.M)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"accuracy", "mcc", "best_accuracy"} <= set(metrics) and metrics["k"] == 2 and metrics["epochs"] == 2
    assert 0 < metrics["trainable_percent"] < 10
    settings = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (settings["max_length"], settings["opt"], settings["dataset"]) == (32, "adamw", "cola")
    assert json.loads((run_dir / "selection.json").read_text())["layers"]
    tokenizer = load_tokenizer(str(tiny_dirs["llama"]))
    model = load_adapter(load_classifier(str(tiny_dirs["llama"]), 2, tokenizer), run_dir / "adapter.safetensors")
    assert len(list(grft_layers(model))) == 14
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/reg_loss", "train/lr", "dev/accuracy", "dev/mcc", "params/trainable"} <= tags
    assert len(events.Scalars("train/lr")) == 2 * 6  # per update: 48 examples / 8, two epochs
    assert trainable_parameters_report(model).trainable == metrics["trainable"]


def test_train_glue_pairs_with_an_encoder_and_full_fine_tuning(tiny_dirs, tmp_path, capsys):
    data = write_glue(tmp_path / "glue", "mrpc", {"train": 32, "dev": 8})
    run_dir = tmp_path / "run"
    assert glue("--dataset", "mrpc", *tiny_args(tiny_dirs["bert"], data, run_dir), "--method", "full") == 0
    assert "f1" in capsys.readouterr().out
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainable_percent"] == 100.0 and {"accuracy", "f1"} <= set(metrics)
    assert "bert.embeddings.word_embeddings.weight" in load_file(run_dir / "trainable.safetensors")


@pytest.mark.slow
def test_train_glue_resume_is_exact(tiny_dirs, tmp_path, monkeypatch):
    data = write_glue(tmp_path / "glue", "rte", {"train": 32, "dev": 8})
    args = ["--dataset", "rte", "--warmup-ratio", "0.2", "--sparse", "2"]
    assert glue(*args, *tiny_args(tiny_dirs["llama"], data, tmp_path / "straight")) == 0
    crash_then_resume(glue, [*args, *tiny_args(tiny_dirs["llama"], data, tmp_path / "resumed")], monkeypatch,
                      crash_epoch=1)
    straight = load_file(tmp_path / "straight" / "adapter.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter.safetensors")
    assert straight.keys() == resumed.keys() and all(torch.equal(straight[k], resumed[k]) for k in straight)
    histories = [json.loads((tmp_path / n / "metrics.json").read_text())["history"] for n in ("straight", "resumed")]
    assert histories[0] == histories[1]


@pytest.mark.slow
def test_train_glue_torchrun_two_processes_match_one(tiny_dirs, tmp_path):
    data = write_glue(tmp_path / "glue", "cola", {"train": 32, "dev": 8})
    common = [str(ROOT / "train_glue.py"), "--dataset", "cola", "--model", str(tiny_dirs["llama"]), "--data-dir",
              str(data), "--max-length", "32", "--batch-size", "8", "--epochs", "2", "--lr", "3e-3", "--quiet"]
    for first, second in zip(*histories_of_one_and_two_processes(common, tmp_path)):
        assert first["accuracy"] == second["accuracy"] and first["mcc"] == pytest.approx(second["mcc"])
        assert first["loss"] == pytest.approx(second["loss"], rel=1e-4)
    assert (json.loads((tmp_path / "one" / "selection.json").read_text())["layers"]
            == json.loads((tmp_path / "two" / "selection.json").read_text())["layers"])
    tokenizer, dataset, collate = tokenized("llama", tiny_dirs["llama"], toy_examples(8, 9))
    batch = collate([dataset[i] for i in range(8)])
    outputs = []
    for name in ("one", "two"):
        model = load_adapter(load_classifier(str(tiny_dirs["llama"]), 2, tokenizer), tmp_path / name / "adapter.safetensors")
        with torch.no_grad():
            outputs.append(model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("case, message", [
    ("unknown task", r"Unknown dataset 'sst2'.*Valid names: cola, mrpc, rte"),
    ("model not found", r"no such local folder.*Hugging Face model id"),
    ("hub model offline", r"could not load the tokenizer of 'nonexistent-org/no-such-model'.*point --model at"),
    ("sequence too long", r"max_length=128 is longer than llama accepts \(64 positions\); use --max-length 64"),
    ("no pad token", r"has no pad token and no EOS token.*--set pad_token="),
    ("no truncation", r"example \d+ is \d+ tokens long, more than max_length=4"),
    ("no data", r"no train data of GLUE CoLA.*--data-dir"),
])
def test_train_glue_clear_errors(tiny_dirs, tmp_path, capsys, monkeypatch, case, message):
    data = write_glue(tmp_path / "glue", "cola", {"train": 8, "dev": 4})
    model, extra, dataset = str(tiny_dirs["llama"]), [], "cola"
    if case == "unknown task":
        dataset = "sst2"
    elif case == "model not found":
        model = str(tmp_path / "missing-model")
    elif case == "hub model offline":
        import huggingface_hub.constants
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        model = "nonexistent-org/no-such-model"
    elif case == "sequence too long":
        extra = ["--max-length", "128"]
    elif case == "no pad token":
        model = str(save_tiny(tmp_path / "no-eos", "llama", eos=False))
    elif case == "no truncation":
        extra = ["--max-length", "4", "--set", "truncation=false"]
    elif case == "no data":
        data = tmp_path / "empty"
    args = ["--dataset", dataset, *tiny_args(Path(model), data, tmp_path / "run"), *extra]
    capsys.readouterr()
    assert glue(*args) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\nerror") == 0
    assert re.search(message, error, re.S), error
