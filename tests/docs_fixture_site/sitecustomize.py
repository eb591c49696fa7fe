"""Applies the docs fixture (tests/docs_fixture.py) to a process the tests start, when GRFT_DOCS_FIXTURE is set
(a JSON object: ``folder``, where the tiny Hugging Face model goes, and ``fgvc_roots``)."""
import json
import os

if os.environ.get("GRFT_DOCS_FIXTURE"):
    from pathlib import Path

    import docs_fixture
    import tensorflow_datasets as tfds

    _settings = json.loads(os.environ["GRFT_DOCS_FIXTURE"])
    docs_fixture.install(setattr, Path(_settings["folder"]), _settings.get("fgvc_roots"))
    _MOCK = tfds.testing.mock_data(num_examples=docs_fixture.MOCK_EXAMPLES)
    _MOCK.__enter__()
