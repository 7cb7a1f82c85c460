"""Student models: `ModelCfg` numbers and presets build a Llama-architecture GQA `StudentLM`."""

from kdforge.model.student import PRESETS, ModelCfg, StudentLM, build_student, preset, write_student

__all__ = ["ModelCfg", "StudentLM", "PRESETS", "preset", "build_student", "write_student"]
