"""Where VTAB-1k data is loaded: prepared TFDS data or the exported JPEG folder layout.

* :class:`VtabTfdsDataset` reads TFDS data prepared in the ``array_record`` format through
  ``tfds.data_source`` (NumPy only, no TensorFlow) and applies the task's official split and label rule.
* :class:`VtabFolderDataset` reads the NOAH/SSF/GPS export: ``<root>/<folder_name>/<split>.txt`` list files
  whose lines are ``relative/path.jpg label``, paths relative to ``<root>/<folder_name>/``.

Both raise :class:`~grft_vision.data.errors.DataNotFoundError` with the steps to get the data when it
is missing.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import textwrap
import warnings
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from PIL import Image
from torch.utils.data import Dataset

from ..errors import ConfigError
from ..extras import MissingDependencyError, import_optional
from .errors import DataNotFoundError
from .image_list import ImageListDataset
from .vtab_tasks import VTAB_SPLITS, VTAB_TASKS, VtabTask

if TYPE_CHECKING:
    import tensorflow_datasets as tfds

__all__ = [
    "TFDS_PREPARE_INSTALL",
    "VtabFolderDataset",
    "VtabTfdsDataset",
    "get_vtab_task",
    "read_vtab_list",
    "select_tfds_version",
]

TFDS_PREPARE_INSTALL = "pip install 'grft-vision[tfds-prepare]'"


def get_vtab_task(task: str | VtabTask) -> VtabTask:
    """Looks a task up by project name (a :class:`VtabTask` is returned as is).

    Raises:
        ConfigError: If the name is not one of the 19 VTAB tasks (a ``ValueError``).
    """
    if isinstance(task, VtabTask):
        return task
    if task not in VTAB_TASKS:
        raise ConfigError(f"Unknown VTAB task {task!r}; expected one of {sorted(VTAB_TASKS)}.")
    return VTAB_TASKS[task]


# --------------------------------------------------------------------------------------------------------
# TFDS layout
# --------------------------------------------------------------------------------------------------------

def _tfds() -> ModuleType:
    """``tensorflow_datasets``, imported only when TFDS data is read (the ``vtab`` extra installs it)."""
    return import_optional("tensorflow_datasets", "reading VTAB-1k from TFDS")


def can_build() -> bool:
    """True when TFDS can build data here (TensorFlow is installed: the ``tfds-prepare`` extra)."""
    return importlib.util.find_spec("tensorflow") is not None


def select_tfds_version(task: VtabTask, data_dir: str) -> str:
    """The TFDS version to read for a task.

    The reference version when it is prepared in ``data_dir``; else the newest prepared version; else
    (nothing prepared) the version the installed tfds builds, the reference one when it still can. A
    version other than the reference one and its ``compatible_versions`` triggers a warning, because the
    official split slices (e.g. ``train[2754:2954]``) assume the reference version's example order.

    Args:
        task: The VTAB task.
        data_dir: TFDS data directory (holds ``<tfds_name>/<version>/dataset_info.json``).

    Returns:
        A version string such as ``"3.0.1"``.
    """
    tfds = _tfds()
    from tensorflow_datasets.core.utils.file_utils import list_dataset_versions

    prepared = [str(v) for v in list_dataset_versions(Path(data_dir, task.tfds_name))]
    if task.tfds_version in prepared:
        return task.tfds_version
    if prepared:
        version = prepared[-1]
    else:
        buildable = [str(v) for v in tfds.builder(task.tfds_name, data_dir=data_dir).versions]
        version = task.tfds_version if task.tfds_version in buildable else buildable[0]
    if version not in (task.tfds_version, *task.compatible_versions):
        warnings.warn(
            f"VTAB task {task.name!r} reads {task.tfds_name}:{version}, not the reference {task.tfds_id} "
            "(not prepared, or not buildable by the installed tfds); the official split slices assume the "
            "reference version's example order.",
            stacklevel=3,
        )
    return version


def _prepare_steps(task: VtabTask, data_dir: str, version: str, manual_instructions: str = "",
                   read_extra: bool = False) -> str:
    """Every step to get a task's data: the extras, (for manual tasks) the files, building it (with the training
    script's own flags, or tfds), and the folder layout as the alternative."""
    tfds_id = f"{task.tfds_name}:{version}"
    install = TFDS_PREPARE_INSTALL + (" (reading it afterwards needs only 'grft-vision[vtab]')" if read_extra else "")
    steps = ["To prepare it once (building downloads the data, so it needs internet, and TensorFlow):",
             f"  1. {install}"]
    if task.manual_download:
        steps += [f"  2. {task.tfds_name} cannot be downloaded automatically: put its files in "
                  f"{Path(data_dir, 'downloads', 'manual')}/ first",
                  textwrap.indent(textwrap.dedent(manual_instructions).strip(), "       ")]
    step = 3 if task.manual_download else 2
    steps += [f"  {step}. python train_vtab.py --dataset {task.name} --data-dir {data_dir} --download   (or: tfds build "
              f"{tfds_id} --data_dir {data_dir} --file_format array_record)",
              f"Or use the exported folder layout instead: --layout folder --data-dir ROOT, with "
              f"ROOT/{task.folder_name}/train800val200.txt and test.txt listing 'relative/path.jpg label' lines."]
    return "\n".join(line for line in steps if line.strip())


def _prepared_versions(task: VtabTask, data_dir: str) -> list[str]:
    """The versions of a task prepared in ``data_dir`` (read from the folders; needs no tfds)."""
    folder = Path(data_dir, task.tfds_name)
    return sorted(path.parent.name for path in folder.glob("*/dataset_info.json")) if folder.is_dir() else []


@contextmanager
def _quiet_absl() -> Iterator[None]:
    """TFDS logs a warning for every unprepared version folder it looks at; the errors here say it once."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def _not_readable_error(
    task: VtabTask, builder: tfds.core.DatasetBuilder, data_dir: str
) -> DataNotFoundError:
    if builder.is_prepared():
        problem = (f"is prepared in {builder.data_dir} in the {builder.info.file_format.value} format, which "
                   "needs TensorFlow to read; this loader reads array_record. Convert it (needs TensorFlow): "
                   f"tfds convert_format --dataset_version_dir={builder.data_dir} "
                   "--out_file_format=array_record, or prepare it again in another data_dir.")
    else:
        problem = f"is not prepared (expected {Path(builder.data_dir, 'dataset_info.json')})."
    return DataNotFoundError(
        f"VTAB task {task.name!r}: TFDS dataset {task.tfds_name}:{builder.version} under data_dir "
        f"{data_dir!r} {problem}\n{_prepare_steps(task, data_dir, str(builder.version), _manual(builder))}"
    )


def _manual(builder: tfds.core.DatasetBuilder) -> str:
    return builder.MANUAL_DOWNLOAD_INSTRUCTIONS or ""


def _download_and_prepare(task: VtabTask, builder: tfds.core.DatasetBuilder, data_dir: str) -> None:
    """Builds the data as array_record; raises :class:`DataNotFoundError` when that cannot work here."""
    steps = _prepare_steps(task, data_dir, str(builder.version), _manual(builder))
    if not can_build():
        raise DataNotFoundError(
            f"VTAB task {task.name!r}: download=True builds {task.tfds_name}:{builder.version} with TFDS, "
            f"which needs TensorFlow, and it is not installed.\n{steps}"
        )
    manual_dir = Path(data_dir, "downloads", "manual")
    if task.manual_download and not (manual_dir.is_dir() and any(manual_dir.iterdir())):
        raise DataNotFoundError(
            f"VTAB task {task.name!r}: {task.tfds_name} needs manually downloaded files in {manual_dir}/, "
            f"which is missing or empty.\n{steps}"
        )
    from tensorflow_datasets.core.file_adapters import FileFormat

    builder.download_and_prepare(file_format=FileFormat.ARRAY_RECORD.value)


class VtabTfdsDataset(Dataset):
    """A VTAB-1k split read from TFDS ``array_record`` data, with the official split and label rule.

    Args:
        task: Project task name (see :data:`~grft_vision.data.vtab_tasks.VTAB_TASKS`) or a ``VtabTask``.
        split: ``train800``, ``val200``, ``train800val200`` or ``test``.
        data_dir: TFDS data directory; ``None`` uses ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``.
        transform: Applied to the RGB PIL image; ``None`` returns the PIL image.
        download: Build the data first when it is missing (``download_and_prepare`` in array_record);
            needs TensorFlow (``pip install 'grft-vision[tfds-prepare]'``).

    Attributes:
        task: The :class:`VtabTask`.
        tfds_id: ``"name:version"`` actually read (see :func:`select_tfds_version`).
        num_classes: Number of classes of the task.
        protocol: ``"vtab_tfds"``, the :func:`~grft_vision.data.transforms.create_transforms` protocol of
            this data (bilinear resize, like the official VTAB code).

    Raises:
        DataNotFoundError: If the data is not prepared in array_record (or parquet) format, or
            ``download=True`` cannot build it (no TensorFlow, missing manual files). The message names
            the task, the data_dir and the commands that prepare it.
        ConfigError: If the task or split name is unknown (a ``ValueError``).
    """

    protocol = "vtab_tfds"

    def __init__(
        self,
        task: str | VtabTask,
        split: str,
        data_dir: str | os.PathLike | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        download: bool = False,
    ) -> None:
        self.task = get_vtab_task(task)
        self.split = split
        self.num_classes = self.task.num_classes
        self.transform = transform
        split_string = self.task.split(split)
        data_dir = os.path.expanduser(os.fspath(data_dir) if data_dir else
                                      os.environ.get("TFDS_DATA_DIR", os.path.join("~", "tensorflow_datasets")))
        tfds = self._import_tfds(data_dir)
        with _quiet_absl():
            self.tfds_id, self.source = self._open(tfds, split_string, data_dir, download)

    def _open(self, tfds: ModuleType, split_string: str, data_dir: str, download: bool
              ) -> tuple[str, Sequence[dict[str, Any]]]:
        """``(tfds id read, random-access source of the split)``, building the data first when ``download``."""
        from tensorflow_datasets.core.file_adapters import FileFormat

        tfds_id = f"{self.task.tfds_name}:{select_tfds_version(self.task, data_dir)}"
        builder = tfds.builder(tfds_id, data_dir=data_dir)
        if download:
            _download_and_prepare(self.task, builder, data_dir)
        try:
            return tfds_id, builder.as_data_source(split=split_string)
        except (NotImplementedError, ValueError) as err:  # tfds' errors for data it cannot random-access
            if builder.is_prepared() and builder.info.file_format in FileFormat.with_random_access():
                raise
            raise _not_readable_error(self.task, builder, data_dir) from err

    def _import_tfds(self, data_dir: str) -> ModuleType:
        """tensorflow_datasets; when it is missing, one error with every step: the data, if it is not there either."""
        try:
            return _tfds()
        except MissingDependencyError as error:
            if _prepared_versions(self.task, data_dir):
                raise
            raise DataNotFoundError(
                f"VTAB task {self.task.name!r} reads TFDS data, which needs tensorflow-datasets (not installed: "
                f"pip install 'grft-vision[vtab]'), and its data is not prepared in {data_dir!r} either.\n"
                f"{_prepare_steps(self.task, data_dir, self.task.tfds_version, read_extra=True)}") from error

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        """Returns ``(image, label)``: the transformed image (a PIL RGB image without transform)."""
        image, label = self.task.rule(self.source[index])
        image = Image.fromarray(image)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


# --------------------------------------------------------------------------------------------------------
# Folder layout (NOAH / SSF / GPS export)
# --------------------------------------------------------------------------------------------------------

def _folder_layout_error(task: VtabTask, root: Path, list_file: Path) -> DataNotFoundError:
    if root.is_dir():
        where = f"{list_file} does not exist"
    else:
        where = f"root {str(root)!r} {'is not a folder' if root.exists() else 'does not exist'}"
    return DataNotFoundError(  # one line: the command-line scripts print it as their error
        f"VTAB task {task.name!r} (folder layout): expected the list file {list_file}, but {where}. "
        f"The NOAH/SSF/GPS layout is <root>/<task folder>/{{{','.join(VTAB_SPLITS)}}}.txt, each line "
        f"'relative/path.jpg label' with paths relative to <root>/<task folder>/; the folder of "
        f"{task.name!r} is {task.folder_name!r}. "
        f"Alternatively, read the task from TFDS (VtabTfdsDataset, layout='tfds'), prepared with: "
        f"{TFDS_PREPARE_INSTALL} && tfds build {task.tfds_id} --data_dir DIR --file_format array_record"
    )


def read_vtab_list(root: str | os.PathLike, task: str | VtabTask, split: str) -> list[tuple[Path, int]]:
    """Reads ``<root>/<folder_name>/<split>.txt``.

    Args:
        root: Directory holding one folder per task (e.g. NOAH's ``vtab-1k``).
        task: Project task name or :class:`VtabTask`.
        split: ``train800``, ``val200``, ``train800val200`` or ``test``.

    Returns:
        ``(absolute image path, label)`` pairs in file order.

    Raises:
        DataNotFoundError: If the root or the list file is missing.
        ConfigError: If the split is unknown, a line is not ``path label`` or a label is outside
            ``[0, num_classes)`` (a ``ValueError``; the message names the file and line).
    """
    task = get_vtab_task(task)
    if split not in VTAB_SPLITS:
        raise ConfigError(f"Unknown VTAB split {split!r}; expected one of {VTAB_SPLITS}.")
    root = Path(root).expanduser()
    task_dir = root / task.folder_name
    list_file = task_dir / f"{split}.txt"
    if not list_file.is_file():
        raise _folder_layout_error(task, root, list_file)
    samples = []
    for number, line in enumerate(list_file.read_text().splitlines(), 1):
        if line.strip():
            parts = line.rsplit(maxsplit=1)
            if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                raise ConfigError(f"{list_file}, line {number}: expected 'relative/path.jpg label', got "
                                  f"{line.strip()[:80]!r}; fix or remove the line.")
            samples.append((task_dir / parts[0], int(parts[1])))
    bad = [label for _, label in samples if not 0 <= label < task.num_classes]
    if bad:
        raise ConfigError(f"{list_file}: labels {sorted(set(bad))[:10]} outside [0, {task.num_classes}); fix the "
                          "list file.")
    return samples


class VtabFolderDataset(ImageListDataset):
    """A VTAB-1k split from the NOAH/SSF/GPS JPEG export (labels already mapped by the task's rule).

    Args:
        root: Directory holding one folder per task, e.g. ``vtab-1k`` with ``cifar/``, ``dtd/``, ...
        task: Project task name or :class:`VtabTask`; its ``folder_name`` is the sub-folder read.
        split: ``train800``, ``val200``, ``train800val200`` or ``test``.
        transform: Applied to the RGB PIL image; ``None`` returns the PIL image.

    Attributes:
        task: The :class:`VtabTask`.
        protocol: ``"vtab"``, the :func:`~grft_vision.data.transforms.create_transforms` protocol of this
            data (bicubic resize, like NOAH/SSF/GPS).

    Raises:
        DataNotFoundError: If the root or the list file is missing (the message shows the layout).
    """

    protocol = "vtab"

    def __init__(
        self,
        root: str | os.PathLike,
        task: str | VtabTask,
        split: str,
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        self.task = get_vtab_task(task)
        self.split = split
        super().__init__(read_vtab_list(root, self.task, split), self.task.num_classes, transform)
