"""Student models: `ModelCfg` numbers and presets build a Llama-architecture GQA `StudentLM`.

`ModelCfg`, `PRESETS` and `preset` come from shape.py (no torch); the rest loads student.py, and
torch with it, on first use, so that importing the numbers stays fast."""

from kdforge.model.shape import PRESETS, ModelCfg, preset

__all__ = ["ModelCfg", "StudentLM", "PRESETS", "preset", "build_student", "write_student"]


def __getattr__(name: str):
    if name in ("StudentLM", "build_student", "write_student"):
        from kdforge.model import student

        return getattr(student, name)
    raise AttributeError(f"module 'kdforge.model' has no attribute {name!r}")
