"""rlbridge_build: the PEP 517 build backend of the rlbridge package (pyproject.toml).

The package is pure Python, so building it is zipping its files with the metadata the wheel
format asks for. setuptools could do that, but only with the `wheel` package beside it, and
the virtual environments of a bare Debian 12 have setuptools without wheel, so `pip install`
would need the network. This backend needs nothing but the standard library:

- build_wheel: rlbridge/**.py + rlbridge-<version>.dist-info (METADATA, WHEEL, RECORD);
- build_editable (`pip install -e`): a rlbridge.pth pointing at this folder instead;
- build_sdist: the folder's sources as rlbridge-<version>.tar.gz.

Metadata comes from the [project] table of pyproject.toml, which holds only "key = string"
lines (read with tomllib where Python has it, 3.11+, else line by line).
"""

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed, so the same sources give the same wheel


def _project():
    """The [project] table of pyproject.toml as a dict of strings."""
    path = os.path.join(HERE, "pyproject.toml")
    try:
        import tomllib
    except ImportError:
        table, out = None, {}
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if line.startswith("["):
                    table = line
                m = re.fullmatch(r'([A-Za-z-]+)\s*=\s*"([^"]*)"', line)
                if table == "[project]" and m:
                    out[m.group(1)] = m.group(2)
        return out
    with open(path, "rb") as f:
        return tomllib.load(f)["project"]


def _package_files():
    """(path inside the wheel, path here) of every module of the package."""
    out = []
    for root, dirs, files in os.walk(os.path.join(HERE, "rlbridge")):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(root, name)
                out.append((os.path.relpath(path, HERE).replace(os.sep, "/"), path))
    return out


def _metadata(p):
    return (f"Metadata-Version: 2.1\nName: {p['name']}\nVersion: {p['version']}\n"
            f"Summary: {p.get('description', '')}\n"
            f"Requires-Python: {p.get('requires-python', '>=3')}\n").encode()


def _write_wheel(wheel_directory, contents):
    """Writes the wheel of contents ({path inside: bytes}) plus dist-info; returns its name."""
    p = _project()
    dist_info = f"{p['name']}-{p['version']}.dist-info"
    contents = dict(contents)
    contents[f"{dist_info}/METADATA"] = _metadata(p)
    contents[f"{dist_info}/WHEEL"] = (b"Wheel-Version: 1.0\nGenerator: rlbridge_build\n"
                                      b"Root-Is-Purelib: true\nTag: py3-none-any\n")
    record = []
    for name, data in contents.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        record.append(f"{name},sha256={digest.decode()},{len(data)}")
    record.append(f"{dist_info}/RECORD,,")
    contents[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = f"{p['name']}-{p['version']}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, wheel), "w",
                         zipfile.ZIP_DEFLATED) as z:
        for name, data in contents.items():
            info = zipfile.ZipInfo(name, ZIP_DATE)
            info.external_attr = 0o644 << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, data)
    return wheel


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    contents = {}
    for name, path in _package_files():
        with open(path, "rb") as f:
            contents[name] = f.read()
    return _write_wheel(wheel_directory, contents)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    return _write_wheel(wheel_directory, {"rlbridge.pth": (HERE + "\n").encode()})


def build_sdist(sdist_directory, config_settings=None):
    p = _project()
    base = f"{p['name']}-{p['version']}"
    files = [("pyproject.toml", os.path.join(HERE, "pyproject.toml")),
             ("rlbridge_build.py", os.path.join(HERE, "rlbridge_build.py"))]
    with tarfile.open(os.path.join(sdist_directory, base + ".tar.gz"), "w:gz") as t:
        for name, path in files + _package_files():
            t.add(path, arcname=f"{base}/{name}")
        info = tarfile.TarInfo(f"{base}/PKG-INFO")
        data = _metadata(p)
        info.size = len(data)
        info.mode = 0o644
        t.addfile(info, io.BytesIO(data))
    return base + ".tar.gz"


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_editable(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []
