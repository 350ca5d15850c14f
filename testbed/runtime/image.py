"""Build (or reuse) the node image, offline or from a public base image.

Two ways, chosen by ``mode``:

``offline`` (default; for engines that cannot pull, like CI here)
    1. Base image ``testbed-base:bookworm``: a Debian root filesystem made with
       ``debootstrap --variant=minbase`` (python3, ca-certificates, iproute2) from the Debian
       mirror, tarred once into the cache (``$XDG_CACHE_HOME/testbed/``) and ``docker import``-ed.
       Reused whenever present; re-imported from the cached tarball when only the image is gone.
    2. The Python packages are the host's own virtual environment, bind-mounted read-only at
       ``/opt/testbed/site`` when a container starts (:func:`python_mounts`). Why: PyPI's
       Linux torch is the CUDA build, and its CPU code still links libtorch_cuda.so, which
       needs ~2 GB of nvidia libraries just to import; copying 5 GB per build is slower than
       the whole test suite, and a mount runs exactly the versions the host tested. Debian
       bookworm's python3 is 3.11, the ABI of the host's cp311 wheels.
    3. Code layer ``testbed-node:<hash>``: the ``testbed`` package copied on top of the base
       (``images/node-offline.Dockerfile``). A code change rebuilds only this: seconds.

``dockerfile`` (a normal machine with a registry)
    ``images/Dockerfile``: ``python:3.11-slim``, the node's requirements exported from
    ``uv.lock`` (``images/requirements-node.txt``: the exact versions and hashes CI tested),
    torch at the lock's version from the CPU wheel index, code last. Nothing is mounted.

``auto`` (the default) picks ``dockerfile`` when ``python:3.11-slim`` is present or can be
pulled, ``offline`` otherwise, and says which.

Environment: ``TESTBED_CACHE_DIR`` (default ``$XDG_CACHE_HOME/testbed`` or
``~/.cache/testbed``) holds the root filesystem tarball and the generated models;
``TESTBED_BASE_TAG`` names the base image's tag (CI builds under a fresh one to prove the cold
path).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from testbed.errors import RuntimeBackendError
from testbed.paths import cache_dir

ImageMode = Literal["auto", "offline", "dockerfile"]
IMAGE_MODES: tuple[str, ...] = ("auto", "offline", "dockerfile")

BASE_REPO = "testbed-base"
BASE_TAG = os.environ.get("TESTBED_BASE_TAG") or "bookworm"
PUBLIC_BASE = ("python", "3.11-slim")  # images/Dockerfile's FROM
NODE_REPO = "testbed-node"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("TESTBED_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "ca-certificates", "iproute2")
SITE_IN_CONTAINER = "/opt/testbed/site"
SRC_IN_CONTAINER = "/opt/testbed/src"
IMAGE_LABEL = "testbed.image"

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = REPO_ROOT / "images"
PACKAGE_DIR = REPO_ROOT / "testbed"


@dataclass(frozen=True)
class ImageInfo:
    tag: str
    mode: ImageMode
    built: bool  # False: reused as it was
    seconds: float
    mounts: tuple[tuple[str, str], ...]  # (host path, container path), read-only, for `offline`


def _log(msg: str) -> None:
    print(f"[image] {msg}", file=sys.stderr, flush=True)


def _client() -> Any:
    import docker

    try:
        return docker.from_env(timeout=600)
    except docker.errors.DockerException as exc:
        raise RuntimeBackendError(f"Docker is not reachable: {exc}; run `testbed doctor`") from exc


def _has_image(client: Any, ref: str) -> bool:
    import docker

    try:
        client.images.get(ref)
        return True
    except docker.errors.ImageNotFound:
        return False


def host_site_packages() -> Path:
    """The running interpreter's site-packages (the venv the CLI runs from)."""
    return Path(sysconfig.get_paths()["purelib"])


def python_mounts(mode: ImageMode) -> tuple[tuple[str, str], ...]:
    if mode != "offline":
        return ()
    if sys.version_info[:2] != (3, 11):
        raise RuntimeBackendError(
            f"the offline image runs Debian bookworm's Python 3.11 with the host's packages mounted; "
            f"this interpreter is {sys.version.split()[0]}: run testbed from a Python 3.11 venv "
            "or use --image-mode dockerfile"
        )
    return ((str(host_site_packages()), SITE_IN_CONTAINER),)


def locked_version(package: str) -> str:
    """``package``'s version in uv.lock (the node image installs what CI tested)."""
    import tomllib

    lock = REPO_ROOT / "uv.lock"
    try:
        data = tomllib.loads(lock.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise RuntimeBackendError(f"{lock}: cannot read the lock ({exc}); run `make lock`") from exc
    for entry in data.get("package", []):
        if entry.get("name") == package:
            return str(entry["version"])
    raise RuntimeBackendError(f"{lock}: {package} is not locked; run `make lock`")


def resolve_auto_mode(client: Any) -> ImageMode:
    """``dockerfile`` when the public base image is here or can be pulled, else ``offline``."""
    import docker

    repo, tag = PUBLIC_BASE
    if _has_image(client, f"{repo}:{tag}"):
        mode: ImageMode = "dockerfile"
        why = f"{repo}:{tag} is present"
    else:
        try:
            client.images.pull(repo, tag=tag)
            mode, why = "dockerfile", f"pulled {repo}:{tag}"
        except docker.errors.DockerException as exc:
            reason = str(exc).splitlines()[0][:160]
            mode, why = "offline", f"{repo}:{tag} cannot be pulled ({reason})"
    _log(f"image mode {mode}: {why}")
    return mode


# -- base image ----------------------------------------------------------------------------


def rootfs_tarball() -> Path:
    return cache_dir() / f"rootfs-{DEBIAN_SUITE}-{'-'.join(BASE_PACKAGES)}.tar"


def _make_rootfs_tarball(dest: Path) -> None:
    from testbed.runtime.sysdeps import SystemDependencyError, ensure_tool

    if os.geteuid() != 0:
        raise SystemDependencyError(
            "building the offline base image runs debootstrap, which needs root: run "
            "`sudo testbed up ...` once (later runs reuse the image), or use --image-mode "
            "dockerfile on a machine that can pull python:3.11-slim"
        )
    ensure_tool("debootstrap")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="testbed-rootfs-", dir=dest.parent) as tmp:
        root = Path(tmp) / "rootfs"
        argv = [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(BASE_PACKAGES)}",
            DEBIAN_SUITE,
            str(root),
            DEBIAN_MIRROR,
        ]
        _log(f"debootstrap {DEBIAN_SUITE} ({', '.join(BASE_PACKAGES)}) from {DEBIAN_MIRROR} ...")
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
        if proc.returncode != 0:
            tail = (proc.stdout + proc.stderr)[-1500:]
            raise RuntimeBackendError(f"debootstrap failed (exit {proc.returncode}):\n{tail}")
        for junk in (
            "var/cache/apt/archives",
            "var/lib/apt/lists",
            "usr/share/doc",
            "usr/share/man",
        ):
            p = root / junk
            if p.exists():
                shutil.rmtree(p)
                p.mkdir(parents=True)
        part = dest.with_suffix(".part")
        with tarfile.open(part, "w") as tar:
            for entry in sorted(os.listdir(root)):
                tar.add(root / entry, arcname=entry)
        part.replace(dest)


def ensure_base_image(client: Any) -> str:
    ref = f"{BASE_REPO}:{BASE_TAG}"
    if _has_image(client, ref):
        return ref
    tarball = rootfs_tarball()
    if not tarball.exists():
        _make_rootfs_tarball(tarball)
    _log(f"docker import {tarball} -> {ref}")
    changes = [
        "ENV LANG=C.UTF-8",
        "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        f"LABEL {IMAGE_LABEL}=base",
    ]
    client.api.import_image_from_file(
        str(tarball), repository=BASE_REPO, tag=BASE_TAG, changes=changes
    )
    if not _has_image(client, ref):
        raise RuntimeBackendError(f"docker import did not produce {ref}")
    return ref


# -- code layer ----------------------------------------------------------------------------


def _package_files() -> list[Path]:
    return sorted(
        p
        for p in PACKAGE_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc", ".pyo")
    )


def code_hash(dockerfile: Path, buildargs: dict[str, str] | None = None) -> str:
    h = hashlib.sha256(dockerfile.read_bytes())
    for key, value in sorted((buildargs or {}).items()):
        h.update(f"{key}={value}".encode())
    for p in _package_files():
        h.update(str(p.relative_to(REPO_ROOT)).encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:12]


def _context_tar(dockerfile: Path, extra: dict[str, Path]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(dockerfile, arcname="Dockerfile")
        for arc, path in extra.items():
            tar.add(path, arcname=arc)
        for p in _package_files():
            tar.add(p, arcname=str(p.relative_to(REPO_ROOT)))
    buf.seek(0)
    return buf


def _build(
    client: Any, dockerfile: Path, tag: str, buildargs: dict[str, str], extra: dict[str, Path]
) -> None:
    import docker

    ctx = _context_tar(dockerfile, extra)
    try:
        client.images.build(
            fileobj=ctx,
            custom_context=True,
            tag=tag,
            buildargs=buildargs,
            rm=True,
            forcerm=True,
            pull=False,
            labels={IMAGE_LABEL: "node"},
        )
    except docker.errors.BuildError as exc:
        log = "".join(str(x.get("stream", x.get("error", ""))) for x in exc.build_log)[-2000:]
        raise RuntimeBackendError(f"building {tag} failed: {exc}\n{log}") from exc
    except docker.errors.APIError as exc:
        raise RuntimeBackendError(f"building {tag} failed: {exc}") from exc


def _recipe(mode: ImageMode) -> tuple[Path, dict[str, str], dict[str, Path]]:
    """(Dockerfile, build args, extra context files) of a concrete image mode."""
    if mode == "offline":
        return IMAGES_DIR / "node-offline.Dockerfile", {"BASE": f"{BASE_REPO}:{BASE_TAG}"}, {}
    if mode == "dockerfile":
        return (
            IMAGES_DIR / "Dockerfile",
            {"TORCH_VERSION": locked_version("torch")},
            {"images/requirements-node.txt": IMAGES_DIR / "requirements-node.txt"},
        )
    raise RuntimeBackendError(f"unknown image mode {mode!r}; use auto, offline or dockerfile")


def node_tag(mode: ImageMode) -> str:
    """The node image's tag for this code, recipe and base (``offline`` or ``dockerfile``)."""
    dockerfile, buildargs, _ = _recipe(mode)
    return f"{NODE_REPO}:{mode}-{code_hash(dockerfile, buildargs)}"


def ensure_image(mode: ImageMode = "auto", *, force: bool = False) -> ImageInfo:
    """Return the node image tag for the current code, building only what is missing.

    Blocking (Docker SDK); call it from a thread in async code.
    """
    t0 = time.monotonic()
    client = _client()
    if mode == "auto":
        mode = resolve_auto_mode(client)
    dockerfile, buildargs, extra = _recipe(mode)
    tag = node_tag(mode)
    mounts = python_mounts(mode)
    if not force and _has_image(client, tag):
        return ImageInfo(tag, mode, False, time.monotonic() - t0, mounts)
    if mode == "offline":
        ensure_base_image(client)
    _log(f"building {tag} ({mode}) ...")
    _build(client, dockerfile, tag, buildargs, extra)
    _prune_old(client, tag)
    return ImageInfo(tag, mode, True, time.monotonic() - t0, mounts)


def _prune_old(client: Any, keep: str) -> None:
    """Drop earlier code layers of the testbed image (a container still using one keeps it)."""
    import docker

    for img in client.images.list(name=NODE_REPO):
        if keep in img.tags:
            continue
        for t in img.tags:
            try:
                client.images.remove(t, noprune=False)
            except docker.errors.APIError:
                pass  # in use by a running testbed
