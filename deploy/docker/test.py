"""The container image, built and run for real: ``make docker-test`` (Linux, as root).

What it does, in order (each step prints a line with its time):

1. a Docker engine: uses the one that answers, else installs Debian's
   ``docker.io`` (with ``debootstrap`` and ``docker-compose``) when missing and
   starts its own ``dockerd``, which it stops at the end;
2. the base: ``deploy/docker/base.sh`` (debootstrap bookworm with Python 3.11,
   ``docker import``; the root file system cached in /var/cache/gateway-docker);
3. the image, as docs/docker.md says: ``pip wheel`` into ``wheels/`` on the
   host, then ``docker build --network none --build-arg BASE=...``;
4. refusals: no config mounted, and a key file open to the group, each one
   clear line and a non-zero exit;
5. two orgs (acme, globex) made on the host with ``gateway init``'s code, peer
   cards exchanged, ports on loopback, each in its own container with
   ``--network host``, the config mounted read-only and ``data_dir`` in a named
   volume; checks uid/gid 10001, the HEALTHCHECK turning healthy, and an
   end-to-end encrypted message both ways with the reference client on the host;
6. durability and signals: globex stopped (``docker stop``: exit 0 within the
   grace period), a message to bob spooled at acme, acme stopped and replaced
   by a new container on the same volume, which still holds the envelope and
   delivers it once globex is back;
7. the image holds no private key, no config or data and none of this run's
   material (searched in ``docker export`` of a container);
8. the same two orgs through ``deploy/docker/compose.yaml`` with ``docker-compose``.

Every certificate, key and config is made at run time in a temporary directory
and removed at the end, with the containers and volumes (all named
``gwtest-<pid>-...``). The image ``federation-gateway:test`` and the base stay,
so a second run is faster. Exit status 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

from gateway.client.api import ClientSession
from gateway.client.contacts import ContactBook
from gateway.client.reference import ReferenceClient
from gateway.core.address import Address
from gateway.crypto.keys import UserKeys
from gateway.devnet import DevOrg, create_org

REPO = Path(__file__).resolve().parents[2]
IMAGE = "federation-gateway:test"
BASE = "gateway-base:bookworm"
UID = 10001
ACME, GLOBEX = "acme.example", "globex.example"
STOP_GRACE = 30  # seconds `docker stop` waits before SIGKILL
HEALTH_TIMEOUT = 60.0
DELIVERY_TIMEOUT = 60.0
DOCKERD_LOG = Path("/var/log/gateway-docker-test-dockerd.log")
PACKAGES = {
    "dockerd": "docker.io",
    "debootstrap": "debootstrap",
    "docker-compose": "docker-compose",
}

#: A PEM private key block with its base64 (the marker alone is in code that parses keys).
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]{64}")

#: Files that carry published test keys of their own: GnuTLS's self-tests (apt needs GnuTLS,
#: so every Debian base has it, python:3.11-slim included).
KNOWN_TEST_VECTORS = re.compile(r"^/usr/lib/[^/]+-linux-gnu/libgnutls\.so\.[0-9.]+$")

T0 = time.monotonic()
PREFIX = f"gwtest-{os.getpid()}"


class CheckFailed(Exception):
    """A check did not hold; the message says which and what was seen."""


def say(text: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {text}", flush=True)


def check(condition: bool, what: str) -> None:
    if not condition:
        raise CheckFailed(what)


def sh(
    *argv: str | Path,
    check_rc: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    quiet: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command; its output is returned (and shown when it fails)."""
    args = [str(a) for a in argv]
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )
    if check_rc and done.returncode != 0:
        if not quiet:
            sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise CheckFailed(f"{' '.join(args)}: exit {done.returncode}")
    return done


def docker(*args: str | Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return sh("docker", *args, **kwargs)


# -- 1. the engine --------------------------------------------------------------------------
def install_missing(commands: Sequence[str]) -> None:
    missing = sorted({PACKAGES[c] for c in commands if shutil.which(c) is None})
    if not missing:
        return
    say(f"installing {', '.join(missing)} (apt-get)")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    sh("apt-get", "update", "-qq", env=env)
    sh("apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing, env=env)


def engine_answers() -> bool:
    return (
        shutil.which("docker") is not None and sh("docker", "info", check_rc=False).returncode == 0
    )


@contextlib.contextmanager
def docker_engine(compose: bool) -> Iterator[None]:
    """A Docker engine for the duration; one we started is stopped again."""
    install_missing(["debootstrap", *(["docker-compose"] if compose else [])])
    if engine_answers():
        say("Docker engine: the one already running")
        yield
        return
    install_missing(["dockerd"])
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with DOCKERD_LOG.open("ab") as log:
        process = subprocess.Popen(
            ["dockerd", "--host", "unix:///var/run/docker.sock"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while not engine_answers():
            if process.poll() is not None or time.monotonic() > deadline:
                raise CheckFailed(f"dockerd did not start; see {DOCKERD_LOG}")
            time.sleep(0.3)
        say(f"Docker engine: started dockerd (pid {process.pid}, log {DOCKERD_LOG})")
        yield
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        say(f"stopped the dockerd this run started (exit {process.returncode})")


# -- 2 and 3. the base and the image --------------------------------------------------------
def build(base: str, *, own_base: bool) -> float:
    if own_base:
        started = time.monotonic()
        sh(REPO / "deploy/docker/base.sh", base, timeout=900)
        say(f"base {base} ready in {time.monotonic() - started:.1f} s")
    wheels = REPO / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    started = time.monotonic()
    sh(sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", wheels, ".", timeout=600)
    say(f"wheels made on the host in {time.monotonic() - started:.1f} s")
    started = time.monotonic()
    docker("build", "--network", "none", "--build-arg", f"BASE={base}", "-t", IMAGE, ".")
    seconds = time.monotonic() - started
    say(f"docker build --network none: {IMAGE} in {seconds:.1f} s")
    return seconds


# -- orgs on the host ----------------------------------------------------------------------
def make_orgs(base: Path) -> tuple[DevOrg, DevOrg]:
    acme, globex = create_org(base, ACME), create_org(base, GLOBEX)
    acme.write_rules(
        peers=[globex],
        groups={
            "engineering": {"members": ["alice"], "send_to": [GLOBEX], "receive_from": [GLOBEX]}
        },
    )
    globex.write_rules(
        peers=[acme],
        groups={"partners": {"members": ["bob"], "send_to": [ACME], "receive_from": [ACME]}},
    )
    for org in (acme, globex):
        config = org.config_path.read_text()
        check("data_dir: data\n" in config, "gateway init wrote data_dir: data")
        org.config_path.write_text(
            config.replace("data_dir: data\n", "data_dir: /var/lib/gateway\n")
        )
        shutil.rmtree(org.directory / "data")  # the data lives in the container's volume
        for path in [org.directory, *org.directory.rglob("*")]:
            os.chown(path, UID, UID, follow_symlinks=False)
    return acme, globex


def readyz(org: DevOrg) -> bool:
    try:
        with urllib.request.urlopen(org.metrics_url + "/readyz", timeout=1.0) as answer:  # noqa: S310
            return bool(answer.status == 200)
    except (urllib.error.URLError, OSError):
        return False


# -- containers ----------------------------------------------------------------------------
def run_container(name: str, org: DevOrg, volume: str) -> float:
    """``docker run -d``; returns seconds from the command to /readyz answering 200."""
    started = time.monotonic()
    docker(
        "run", "-d", "--name", name, "--network", "host",
        "--stop-timeout", str(STOP_GRACE),
        "-v", f"{org.directory}:/etc/gateway:ro",
        "-v", f"{volume}:/var/lib/gateway",
        IMAGE,
    )  # fmt: skip
    return wait_ready(name, org, started)


def wait_ready(name: str, org: DevOrg, started: float) -> float:
    """Wait for /readyz to answer 200; returns seconds since ``started``."""
    deadline = started + HEALTH_TIMEOUT
    while not readyz(org):
        if time.monotonic() > deadline:
            logs = docker("logs", name, check_rc=False)
            raise CheckFailed(
                f"{name}: not ready in {HEALTH_TIMEOUT:.0f} s:\n{logs.stderr[-2000:]}"
            )
        time.sleep(0.05)
    return time.monotonic() - started


def inspect(name: str, template: str) -> str:
    return docker("inspect", "-f", template, name).stdout.strip()


def wait_healthy(name: str) -> float:
    started = time.monotonic()
    while True:
        status = inspect(name, "{{.State.Health.Status}}")
        if status == "healthy":
            return time.monotonic() - started
        check(status in ("starting", ""), f"{name}: health {status}")
        check(time.monotonic() - started < HEALTH_TIMEOUT, f"{name}: not healthy in time")
        time.sleep(0.5)


def stop(name: str) -> float:
    """``docker stop``: the gateway must exit 0 on SIGTERM within the grace period."""
    started = time.monotonic()
    docker("stop", "-t", str(STOP_GRACE), name, timeout=STOP_GRACE + 30)
    seconds = time.monotonic() - started
    code = inspect(name, "{{.State.ExitCode}}")
    check(code == "0", f"{name}: exit code {code} after docker stop (want 0)")
    check(seconds < STOP_GRACE, f"{name}: docker stop took {seconds:.1f} s")
    last = docker("logs", "--tail", "1", name).stderr.strip()
    check(last.endswith(" stopped"), f"{name}: last log line: {last}")
    return seconds


def refusal(args: Sequence[str], expected: str) -> str:
    """A container that must refuse to start: non-zero exit, ``expected`` in one line."""
    name = f"{PREFIX}-refusal"  # named, so that cleanup() removes one that did start
    done = docker(
        "run", "--rm", "--name", name, "--network", "none", *args, IMAGE, check_rc=False, timeout=60
    )
    errors = [line for line in done.stderr.splitlines() if line.startswith("gateway: error:")]
    check(done.returncode != 0, f"docker run {' '.join(args)}: started (exit {done.returncode})")
    check("Traceback" not in done.stderr, f"a traceback:\n{done.stderr}")
    check(
        len(errors) == 1 and expected in errors[0],
        f"want one line with {expected!r}:\n{done.stderr}",
    )
    return errors[0]


def exec_gateway(name: str, *args: str) -> str:
    return docker("exec", name, "gateway", *args, "-c", "/etc/gateway/gateway.yaml").stdout


# -- the reference client on the host -------------------------------------------------------
class RememberingSession(ClientSession):
    """A session that answers a key lookup it made before from memory.

    Records are signed by the recipient's org and checked by the client as
    usual; remembering them lets a message be sealed and submitted while the
    recipient's gateway is down, which is what puts it in the sender's spool.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: dict[str, dict[str, Any]] = {}

    async def lookup_keys(self, address: str) -> dict[str, Any]:
        if address not in self.records:
            self.records[address] = await super().lookup_keys(address)
        return self.records[address]


class User:
    def __init__(self, org: DevOrg, name: str, token: str, directory: Path) -> None:
        self.org = org
        self.address = Address.of(name, org.org)
        self.keys = UserKeys.generate(self.address)
        self.keys.save(directory / f"{name}.keys.json")
        self.contacts_file = directory / f"{name}.contacts.json"
        self.token = token
        self.records: dict[str, dict[str, Any]] = {}

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[ReferenceClient]:
        session = RememberingSession(
            self.org.client_url, self.token, ca_file=self.org.ca_file, timeout=15.0
        )
        session.records = self.records
        async with session:
            yield ReferenceClient(session, self.keys, ContactBook.load(self.contacts_file))

    def publish(self) -> None:
        async def go() -> None:
            async with self.client() as client:
                await client.publish()

        trio.run(go)

    def send(self, to: User, text: str) -> tuple[str, str]:
        async def go() -> tuple[str, str]:
            async with self.client() as client:
                sent = await client.send(to.address, text)
                return sent.envelope_id, sent.status or ""

        return trio.run(go)

    def receive(self, envelope_id: str) -> str:
        async def go() -> str:
            async with self.client() as client:
                with trio.move_on_after(DELIVERY_TIMEOUT):
                    while True:
                        inbox = await client.receive(wait=5)
                        check(not inbox.problems, f"{self.address}: {inbox.problems}")
                        for message in inbox.messages:
                            if message.envelope_id == envelope_id:
                                return message.text
            raise CheckFailed(f"{envelope_id} did not reach {self.address} in time")

        return trio.run(go)


def users(
    acme_name: str, globex_name: str, acme: DevOrg, globex: DevOrg, base: Path
) -> tuple[User, User]:
    clients = base / "clients"
    clients.mkdir(parents=True, exist_ok=True)
    alice = User(acme, "alice", exec_gateway(acme_name, "token", "issue", "alice").strip(), clients)
    bob = User(globex, "bob", exec_gateway(globex_name, "token", "issue", "bob").strip(), clients)
    alice.publish()
    bob.publish()
    return alice, bob


def both_ways(alice: User, bob: User, tag: str) -> None:
    hello = f"Hi Bob, from a container ({tag})."
    envelope_id, _ = alice.send(bob, hello)
    check(bob.receive(envelope_id) == hello, "bob read alice's text")
    reply = f"Hi Alice, back from globex ({tag})."
    envelope_id, _ = bob.send(alice, reply)
    check(alice.receive(envelope_id) == reply, "alice read bob's text")


# -- 7. what the image holds ----------------------------------------------------------------
def scan_image(needles: dict[str, bytes]) -> int:
    """Search every file of the image's file system; returns how many files were read."""
    name = f"{PREFIX}-scan"
    docker("create", "--name", name, IMAGE)
    try:
        export = subprocess.Popen(
            ["docker", "export", name], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
        assert export.stdout is not None
        problems: list[str] = []
        files = 0
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            for member in tar:
                path = "/" + member.name.removeprefix("./").lstrip("/")
                if path.startswith(("/etc/gateway/", "/var/lib/gateway/")) and member.isfile():
                    problems.append(f"{path}: a file where config or data is mounted")
                if path.endswith((".key", ".sqlite3", "/gateway.yaml", "/rules.yaml")):
                    problems.append(f"{path}: looks like config, key or data")
                if "/site-packages/tests/" in path or path.startswith("/src/"):
                    problems.append(f"{path}: test or source tree")
                if not member.isfile():
                    continue
                files += 1
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
                if PEM_PRIVATE_KEY.search(data) and not KNOWN_TEST_VECTORS.search(path):
                    problems.append(f"{path}: holds a PEM private key")
                problems.extend(
                    f"{path}: holds {what}" for what, needle in needles.items() if needle in data
                )
        export.wait()
        check(export.returncode == 0, "docker export failed")
        check(not problems, "the image holds what it must not:\n  " + "\n  ".join(problems))
        return files
    finally:
        docker("rm", "-f", "-v", name, check_rc=False)


def run_material(orgs: Sequence[DevOrg]) -> dict[str, bytes]:
    """Unique pieces of this run's certificates and keys, to look for in the image."""
    needles: dict[str, bytes] = {}
    for org in orgs:
        for rel in ("pki/ca.pem", "pki/gateway.pem", "pki/ca.key", "keys/org-signing.key"):
            data = (org.directory / rel).read_bytes()
            if rel.endswith(".key"):  # positive control: the search does see a real key
                check(bool(PEM_PRIVATE_KEY.search(data)), f"the key pattern misses {rel}")
            lines = data.splitlines()
            needles[f"{org.org}'s {rel}"] = lines[1]  # the first line of base64
    return needles


# -- 8. compose --------------------------------------------------------------------------------
def compose_check(acme: DevOrg, globex: DevOrg, base: Path) -> None:
    project = f"{PREFIX}-compose"
    env = {
        "ACME_DIR": str(acme.directory),
        "GLOBEX_DIR": str(globex.directory),
        "GATEWAY_IMAGE": IMAGE,
    }
    command = ["docker-compose", "-p", project, "-f", str(REPO / "deploy/docker/compose.yaml")]
    try:
        started = time.monotonic()
        sh(*command, "up", "-d", env=env, timeout=120)
        names = {}
        for service in ("acme", "globex"):
            cid = sh(*command, "ps", "-q", service, env=env).stdout.strip()
            check(bool(cid), f"compose: no container for {service}")
            names[service] = cid
        for name in names.values():
            wait_healthy(name)
        say(f"compose: acme and globex healthy {time.monotonic() - started:.1f} s after up -d")
        alice, bob = users(names["acme"], names["globex"], acme, globex, base / "compose")
        both_ways(alice, bob, "compose")
        say("compose: an end-to-end encrypted message each way")
        sh(*command, "stop", "-t", str(STOP_GRACE), env=env, timeout=STOP_GRACE + 60)
        for service, name in names.items():
            code = inspect(name, "{{.State.ExitCode}}")
            check(code == "0", f"compose: {service} exit code {code} after stop")
        say("compose: docker-compose stop: both exit 0")
    finally:
        sh(*command, "down", "-v", "--remove-orphans", env=env, check_rc=False, timeout=120)


# -- the whole run ----------------------------------------------------------------------------
def scenario(base_dir: Path, *, compose: bool) -> dict[str, float]:
    figures: dict[str, float] = {}
    # 4. refusals
    line = refusal([], "/etc/gateway/gateway.yaml: no such file")
    say(f"no config mounted: refused: {line}")
    acme, globex = make_orgs(base_dir)
    bad = base_dir / "bad"
    shutil.copytree(acme.directory, bad, symlinks=True)
    for path in [bad, *bad.rglob("*")]:
        os.chown(path, UID, UID, follow_symlinks=False)
    (bad / "pki/gateway.key").chmod(0o640)
    line = refusal(
        ["-v", f"{bad}:/etc/gateway:ro"],
        "/etc/gateway/pki/gateway.key: the private key file is accessible by group or others "
        "(mode 0640); run: chmod 600 /etc/gateway/pki/gateway.key",
    )
    say(f"key file mode 0640: refused: {line}")

    # 5. two orgs, one container each
    a_name, g_name = f"{PREFIX}-acme", f"{PREFIX}-globex"
    a_vol, g_vol = f"{PREFIX}-acme-data", f"{PREFIX}-globex-data"
    figures["start_acme"] = run_container(a_name, acme, a_vol)
    figures["start_globex"] = run_container(g_name, globex, g_vol)
    say(
        f"acme ready {figures['start_acme']:.2f} s and globex {figures['start_globex']:.2f} s "
        "after docker run (config read-only, data in a volume, --network host)"
    )
    for name in (a_name, g_name):
        check(inspect(name, "{{.Config.User}}") == f"{UID}:{UID}", f"{name}: image user")
        status = docker("exec", name, "cat", "/proc/1/status").stdout
        ids = {
            line.split(":")[0]: line.split()[1:]
            for line in status.splitlines()
            if line.startswith(("Uid:", "Gid:"))
        }
        check(ids == {"Uid": [str(UID)] * 4, "Gid": [str(UID)] * 4}, f"{name}: pid 1 runs as {ids}")
        cmdline = docker("exec", name, "cat", "/proc/1/cmdline").stdout.replace("\0", " ")
        check("gateway run" in cmdline, f"{name}: pid 1 is {cmdline!r}")
        mounts = json.loads(inspect(name, "{{json .Mounts}}"))
        check(
            any(m["Destination"] == "/etc/gateway" and not m["RW"] for m in mounts),
            f"{name}: /etc/gateway not read-only",
        )
        check(
            any(m["Destination"] == "/var/lib/gateway" and m["Type"] == "volume" for m in mounts),
            f"{name}: /var/lib/gateway not a volume",
        )
    say(f"both run as uid/gid {UID} (pid 1 is `gateway run`), /etc/gateway ro, data in volumes")
    figures["healthy_acme"] = wait_healthy(a_name)
    wait_healthy(g_name)
    say(f"HEALTHCHECK: both healthy (acme {figures['healthy_acme']:.1f} s after ready)")
    alice, bob = users(a_name, g_name, acme, globex, base_dir)
    both_ways(alice, bob, "docker run")
    say("an end-to-end encrypted message each way (reference client on the host)")

    # 6. signals and durability
    figures["stop_globex"] = stop(g_name)
    say(f"docker stop globex: exit 0 in {figures['stop_globex']:.2f} s (grace {STOP_GRACE} s)")
    spooled_text = "Sent while globex was down, kept across a new container."
    envelope_id, status = alice.send(bob, spooled_text)
    check(status in ("accepted", "spooled", "queued"), f"submit status {status}")
    lane = json.loads(exec_gateway(a_name, "spool", "ls", "--json"))
    check(envelope_id in json.dumps(lane), f"{envelope_id} not in acme's spool: {lane}")
    figures["stop_acme"] = stop(a_name)
    say(f"docker stop acme with {envelope_id} spooled: exit 0 in {figures['stop_acme']:.2f} s")
    docker("rm", a_name)
    a_name = f"{PREFIX}-acme-2"
    figures["restart_acme"] = run_container(a_name, acme, a_vol)
    lane = json.loads(exec_gateway(a_name, "spool", "ls", "--json"))
    check(envelope_id in json.dumps(lane), f"{envelope_id} lost with the container: {lane}")
    say(
        f"a new acme container on the same volume holds {envelope_id} "
        f"(ready in {figures['restart_acme']:.2f} s)"
    )
    docker("start", g_name)
    wait_ready(g_name, globex, time.monotonic())  # bob's client connects to it at once
    exec_gateway(a_name, "spool", "retry")
    check(bob.receive(envelope_id) == spooled_text, "bob read the spooled text")
    say("globex started again: the spooled message reached bob")
    for name in (a_name, g_name):
        stop(name)
    for name in (a_name, g_name):
        docker("rm", name)

    # 7. what the image holds
    files = scan_image(run_material([acme, globex]))
    say(f"the image ({files} files) holds no private key, config, data or material of this run")

    # 8. compose
    if compose:
        compose_check(acme, globex, base_dir)
    return figures


def cleanup() -> None:
    names = docker("ps", "-aq", "--filter", f"name={PREFIX}-", check_rc=False).stdout.split()
    if names:
        docker("rm", "-f", "-v", *names, check_rc=False)
    volumes = docker(
        "volume", "ls", "-q", "--filter", f"name={PREFIX}-", check_rc=False
    ).stdout.split()
    if volumes:
        docker("volume", "rm", "-f", *volumes, check_rc=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--base",
        metavar="IMAGE",
        help=f"build FROM this image instead of bootstrapping {BASE} (e.g. python:3.11-slim)",
    )
    parser.add_argument("--no-compose", action="store_true", help="skip the docker-compose part")
    args = parser.parse_args(argv)
    if not sys.platform.startswith("linux") or os.geteuid() != 0:
        print(
            "docker test: needs Linux and root (it may install and start dockerd)", file=sys.stderr
        )
        return 2
    compose = not args.no_compose
    try:
        with docker_engine(compose):
            build_seconds = build(args.base or BASE, own_base=args.base is None)
            size = int(docker("image", "inspect", "-f", "{{.Size}}", IMAGE).stdout)
            say(f"image {IMAGE}: {size / 1e6:.0f} MB")
            with tempfile.TemporaryDirectory(prefix="gateway-docker-test-") as tmp:
                try:
                    figures = scenario(Path(tmp), compose=compose)
                finally:
                    cleanup()
    except (CheckFailed, subprocess.TimeoutExpired) as exc:
        say(f"FAILED: {exc}")
        return 1
    say(
        f"PASSED in {time.monotonic() - T0:.0f} s: build {build_seconds:.1f} s, image "
        f"{size / 1e6:.0f} MB, docker run to ready {figures['start_acme']:.2f} s, "
        f"docker stop {figures['stop_acme']:.2f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
