"""A config file: its TOML read strictly, and its path settings taken relative to its folder."""
from __future__ import annotations

import os
from pathlib import Path

_PATH_FIELDS = {"transformer_path", "vae_path", "clip_path", "t5_path", "dataset_dir", "tokenizer_dir", "clip_tokenizer_dir",
                "t5_tokenizer_dir", "validation_transformer_path", "cache_dir", "output_dir", "init_lora", "store_dir",
                "validation_dir", "control_dir"}
_MADE_PATH_FIELDS = {"cache_dir", "output_dir", "store_dir"}  # folders a run creates: the others must exist
_CONTROL_NAMES = {"\n": "newline", "\t": "tab", "\r": "carriage return", "\b": "backspace", "\f": "form feed"}


def config_paths(values: dict, source: str):
    """(the dict holding it, key, value, where) for each path setting of a config file's values, the
    `[[datasets]]` tables' included (those are copied, so that the caller may set them)."""
    for key in sorted(_PATH_FIELDS & set(values)):
        yield values, key, values[key], source
    if isinstance(values.get("datasets"), (list, tuple)):
        values["datasets"] = [dict(e) if isinstance(e, dict) else e for e in values["datasets"]]
        for n, entry in enumerate(values["datasets"], 1):
            for key in ("dataset_dir", "control_dir"):
                if isinstance(entry, dict) and entry.get(key):
                    yield entry, key, entry[key], f"{source} [[datasets]] #{n}"


def resolve_config_path(key: str, value, base_dir: str | Path, source: str):
    """A path setting of a config file, relative paths taken from `base_dir` (the file's folder). A path with a
    control character in it (a TOML escape in "double quotes": "C:\\new" holds a newline) is refused."""
    if not isinstance(value, str) or not value:
        return value
    control = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        name = _CONTROL_NAMES.get(control, f"control character {control!r}")
        raise ValueError(f"{source}: {key} = {value!r} holds a {name}: in \"double quotes\" TOML reads \\n as a "
                         "newline and \\t as a tab; write Windows paths in 'single quotes' or with /")
    return value if Path(value).expanduser().is_absolute() else str(Path(os.path.abspath(base_dir)) / value)


def check_relative_paths(values: dict, base_dir: str | Path, source: str) -> None:
    """Each relative input path of a config file's `values` (the files and folders a run reads) exists where it was
    taken from; else FileNotFoundError naming the key, the path tried and the folder it was taken from, the config
    file's (a user who runs from another folder expects the working folder)."""
    folder = Path(os.path.abspath(base_dir))
    for _, key, value, where in config_paths(dict(values), source):
        if key in _MADE_PATH_FIELDS or not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        if not (folder / value).exists():
            raise FileNotFoundError(f"{where}: {key} = {value!r}: {folder / value} does not exist (a relative path is "
                                    f"taken from the config file's folder {folder}, not the working folder); fix the "
                                    "path, or give an absolute one")


def read_toml(path: str | Path) -> dict:
    import tomllib

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; give the path of a .toml file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # Notepad's BOM is fine
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        # in "double quotes" a backslash starts an escape, so "C:\Users\me" is an error
        hint = " (write Windows paths in 'single quotes' or with /)" if "\\" in text else ""
        raise ValueError(f"{path}: not valid TOML ({e}); fix the line it names{hint}") from e
