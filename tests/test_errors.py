"""One user-error base class: the UI and the CLI both show every engine error with advice as a message."""

import pytest

from studio.cli import SUBCOMMANDS, _is_user_error, main
from studio.engine.learned.word import ConceptError, ConceptMismatchError
from studio.engine.memory import OutOfMemory
from studio.engine.models import ModelError
from studio.engine.names import WordError
from studio.engine.pictures import PictureError
from studio.errors import UserError
from studio.training import TrainError


@pytest.mark.parametrize("cls", [ConceptError, ConceptMismatchError, ModelError, OutOfMemory, TrainError,
                                 PictureError, WordError])
def test_every_engine_error_with_advice_is_a_user_error(cls):
    assert issubclass(cls, UserError) and issubclass(cls, ValueError)
    error = cls("x.png", "not a picture") if cls is PictureError else cls("what to do")
    assert _is_user_error(error)
    from studio.ui.state import USER_ERRORS

    assert isinstance(error, USER_ERRORS)


def test_model_errors_stay_runtime_errors():
    """The trainer finds a preview's OutOfMemory among RuntimeErrors (torch's own OOM is one)."""
    assert issubclass(ModelError, RuntimeError) and issubclass(OutOfMemory, RuntimeError)


def test_plain_value_and_missing_file_errors_are_still_shown_as_messages():
    assert _is_user_error(ValueError("steps must be at least 1")) and _is_user_error(FileNotFoundError("x"))
    assert not _is_user_error(RuntimeError("a bug")) and not _is_user_error(KeyError("a bug"))


def test_a_user_error_is_one_line_with_exit_code_2(tmp_path, capsys):
    missing = tmp_path / "none.safetensors"
    assert main(["concepts", "inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("studio concepts: error:") and len(err.strip().splitlines()) == 1


def test_every_listed_subcommand_has_its_module():
    """Guards a sub-command listed (e.g. "serve") that `--help` silently leaves out because no module exists."""
    import importlib.util

    assert [name for name in SUBCOMMANDS if importlib.util.find_spec(f"studio.cli.{name}_cmd") is None] == []
