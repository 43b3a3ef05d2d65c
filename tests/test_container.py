"""The container recipe, checked without a Docker engine.

No engine runs here and no base image can be pulled, so these tests read the Dockerfile and
docker-compose.yml, then replay the Dockerfile's COPY and RUN (pip) steps into a fresh virtual
environment and start its CMD there: the same pins, the same non-editable install, the same
command, run from an empty directory and with every proxy variable pointing at a closed port,
so that a download at run time fails.
"""

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ruamel.yaml import YAML  # installed with check-jsonschema

ROOT = Path(__file__).resolve().parents[1]
CMD = ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
HEALTH_URL = "http://127.0.0.1:8000/readyz"  # healthy once ready: the port opens before that
STARTUP_TIMEOUT_S = 120
STEP_TIMEOUT_S = 300
DEAD_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, a connection is refused


# --- parsing ------------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append((keyword.upper(), " ".join(args.split())))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return instructions


def only(instruction: str) -> str:
    found = [args for keyword, args in dockerfile() if keyword == instruction]
    assert len(found) == 1, f"expected one {instruction}, found {found}"
    return found[0]


def healthcheck_command() -> list[str]:
    options, _, command = only("HEALTHCHECK").partition(" CMD ")
    assert command, f"HEALTHCHECK needs an exec-form CMD: {options}"
    return json.loads(command)


def compose() -> dict:
    return YAML(typ="safe", pure=True).load((ROOT / "docker-compose.yml").read_text())


def compose_service(name: str = "attention") -> dict:
    return compose()["services"][name]


def pyproject_torch_pin() -> str:
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [dep for dep in dependencies if re.match(r"torch\s*[=<>!~]", dep)]
    assert re.fullmatch(r"torch==[\w.+]+", pin), f"pyproject.toml must pin torch exactly: {pin}"
    return pin


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def dockerignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*")
        regex = regex.replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, candidate) for candidate in candidates):
            ignored = not negated
    return ignored


# --- the static checks ----------------------------------------------------------------------------


def test_dockerfile_base_image_user_and_command() -> None:
    assert re.fullmatch(r"python:3\.11-slim\S*", only("FROM")), only("FROM")
    assert only("EXPOSE") == "8000"
    assert json.loads(only("CMD")) == CMD
    env = " ".join(args for keyword, args in dockerfile() if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    user = [args for keyword, args in dockerfile() if keyword == "USER"]
    assert user, "the image must not run as root"
    assert user[-1].split(":")[0] not in {"root", "0"}, user[-1]
    command = healthcheck_command()
    assert command[0] == "python", command
    assert HEALTH_URL in command[-1], command


def test_dockerfile_installs_pinned_cpu_torch_before_the_code() -> None:
    runs = [args for keyword, args in dockerfile() if keyword == "RUN"]
    torch_installs = [run for run in runs if re.search(r"pip install .*\btorch\b", run)]
    assert len(torch_installs) == 1, torch_installs
    (torch_install,) = torch_installs
    assert pyproject_torch_pin() in torch_install.split(), "the Dockerfile's torch pin drifted"
    assert '--index-url "$TORCH_INDEX_URL"' in torch_install
    assert "download.pytorch.org/whl/cpu" in only("ARG")
    steps = [f"{keyword} {args}" for keyword, args in dockerfile()]
    torch_step = steps.index(f"RUN {torch_install}")
    code_steps = [i for i, step in enumerate(steps) if re.match(r"COPY (attention|service)/", step)]
    assert code_steps, "the Dockerfile must copy the packages"
    assert torch_step < min(code_steps)
    # The dependency layer sees pyproject.toml only; the code is installed on top of it.
    assert steps.index("COPY pyproject.toml ./") < min(code_steps)
    code_install = "RUN pip install --no-cache-dir --no-deps ."
    assert code_install in steps[max(code_steps) :], "the code is installed last, non-editable"
    assert not any(re.search(r"\s-e\s|--editable", run) for run in runs)


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    patterns = dockerignore_patterns()
    for needed in ["pyproject.toml", "README.md", "attention/__init__.py", "service/main.py"]:
        assert not dockerignored(needed, patterns), needed
    for unwanted in [".venv/bin/python", ".git/HEAD", "tests/test_container.py"]:
        assert dockerignored(unwanted, patterns), unwanted
    assert dockerignored("service/__pycache__/main.cpython-311.pyc", patterns)


def test_compose_builds_the_image_publishes_8000_and_checks_health() -> None:
    service = compose_service()
    build = service["build"]
    build = {"context": build} if isinstance(build, str) else build
    assert build["context"] in {".", "./"}
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    ports = [str(port) for port in service["ports"]]
    assert any(re.fullmatch(r"(\S+:)?(\d+:)?8000(/tcp)?", port) for port in ports), ports
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD"
    assert test[1:] == healthcheck_command(), "compose and Dockerfile healthchecks differ"
    assert service["read_only"] is True
    assert "/tmp" in service["tmpfs"]
    assert service["restart"] in {"always", "unless-stopped", "on-failure"}


def test_compose_environment_names_real_settings() -> None:
    from service.settings import Settings

    examples = re.findall(r"#\s*(ATTENTION_\w+):", (ROOT / "docker-compose.yml").read_text())
    services = [name for name in compose()["services"] if name.startswith("attention")]
    names = [*examples]
    for name in services:
        names += [*compose_service(name).get("environment", {})]
    assert examples, "leave commented examples of the settings"
    for name in names:
        assert name.startswith("ATTENTION_"), name
        assert name.removeprefix("ATTENTION_").lower() in Settings.model_fields, name


# --- one-host scale-out: replicas behind nginx ---------------------------------------------------

NGINX_CONF = ROOT / "deploy" / "nginx" / "nginx.conf"
SCALE_COMMAND = "docker compose --profile scale up --build --scale attention-replica="


def nginx_directives(text: str) -> list[list[str]]:
    """Every `name args...;` of nginx.conf, comments dropped, blocks flattened."""
    text = re.sub(r"#[^\n]*", "", text)
    return [statement.split() for statement in re.split(r"[;{}]", text) if statement.strip()]


def nginx_values(name: str) -> list[list[str]]:
    return [words[1:] for words in nginx_directives(NGINX_CONF.read_text()) if words[0] == name]


def app_get_paths() -> set[str]:
    from service.main import create_app
    from service.settings import Settings

    paths = create_app(Settings()).openapi()["paths"]
    return {path for path, operations in paths.items() if "get" in operations}


def test_compose_documents_the_scale_out_command() -> None:
    header = (ROOT / "docker-compose.yml").read_text()
    assert SCALE_COMMAND in header
    assert "nginx -s reload" in header, "say how nginx learns of a new replica count"


def test_compose_replicas_are_the_service_without_a_fixed_host_port() -> None:
    single, replica = compose_service(), compose_service("attention-replica")
    assert replica["profiles"] == ["scale"]
    # --scale N needs no host port: N containers cannot all bind one.
    assert "ports" not in replica
    assert [str(port) for port in replica["expose"]] == ["8000"]
    for key in ["build", "image", "healthcheck", "read_only", "tmpfs", "cap_drop", "restart"]:
        assert replica[key] == single[key], key
    assert replica["environment"]["ATTENTION_TORCH_THREADS"] == "1", "one core per replica"
    assert "profiles" not in single, "`docker compose up` still starts the single service"


def test_compose_load_balancer_is_official_nginx_on_8080_in_front_of_the_replicas() -> None:
    lb = compose_service("lb")
    assert re.fullmatch(r"nginx:[\w.-]+", lb["image"]), "the official image, pinned"
    assert lb["profiles"] == ["scale"]
    assert [str(port) for port in lb["ports"]] == ["8080:8080"]
    (mount,) = lb["volumes"]
    source, target, mode = mount.split(":")
    assert (ROOT / source).resolve() == NGINX_CONF
    assert (target, mode) == ("/etc/nginx/nginx.conf", "ro")
    assert lb["depends_on"] == {"attention-replica": {"condition": "service_healthy"}}
    # Unprivileged on a read-only root: the writable paths nginx.conf uses are the tmpfs.
    assert lb["read_only"] is True
    assert lb["cap_drop"] == ["ALL"]
    assert str(lb["user"]).split(":")[0] not in {"0", "root"}
    assert "/tmp" in lb["tmpfs"]
    # Its healthcheck asks nginx, on its own port, for a route the app really serves.
    test = lb["healthcheck"]["test"]
    assert test[0] == "CMD"
    url = urllib.parse.urlsplit(test[-1])
    assert (url.hostname, url.port) == ("127.0.0.1", 8080)
    assert url.path in app_get_paths()


def test_nginx_conf_agrees_with_compose_and_the_app() -> None:
    from service.settings import Settings

    assert nginx_values("listen") == [["8080"]]
    ((address, *_),) = [words for words in nginx_values("server") if words and ":" in words[0]]
    host, port = address.split(":")
    assert host == "attention-replica" and host in compose()["services"]
    assert port == str(compose_service("attention-replica")["expose"][0]) == "8000"
    assert nginx_values("proxy_pass") == [["http://attention"]]
    assert nginx_values("upstream") == [["attention"]]
    # Bodies up to the app's own limit reach the app, which answers 413 itself beyond it.
    ((size,),) = nginx_values("client_max_body_size")
    assert size.endswith("m") and int(size[:-1]) * 2**20 == Settings().max_body_bytes
    # Nothing written outside /tmp (the tmpfs); no `user` (it runs unprivileged already).
    for name in ["pid", *(f"{kind}_temp_path" for kind in ["client_body", "proxy"])]:
        ((path,),) = nginx_values(name)
        assert path.startswith("/tmp/"), name
    assert not nginx_values("user")


# --- the recipe ---------------------------------------------------------------------------------


@dataclass
class Server:
    base_url: str
    port: int
    env: dict[str, str]
    venv: Path
    workdir: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, timeout: float = 10) -> tuple[int, str, bytes]:
    """(status, content type, body), without any proxy."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as response:
        return response.status, response.headers.get("content-type", ""), response.read()


def run_step(command: list[str], cwd: Path, env: dict[str, str]) -> None:
    result = subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=STEP_TIMEOUT_S
    )
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"


def replay_build(fs: Path, venv: Path) -> tuple[Path, dict[str, str]]:
    """Run the Dockerfile's ARG/ENV/WORKDIR/COPY steps and its pip RUN steps, into `venv`.

    Absolute paths in the image land under `fs`; the `pip` the RUN steps call is the venv's.
    Steps that change the system (useradd) are left out. An ARG set in the environment
    overrides its default, as `--build-arg` does; with no TORCH_INDEX_URL there, the index
    option is dropped and pip's own configuration finds the torch wheel (here: a local one).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env |= {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{env['PATH']}"}
    env["PIP_NO_COMPILE"] = "1"  # only the replay skips byte-compiling, to save time
    patterns = dockerignore_patterns()
    workdir = fs
    for keyword, args in dockerfile():
        if keyword == "ARG":
            name, _, default = args.partition("=")
            env[name] = os.environ.get(name, default)
        elif keyword == "ENV":
            env |= dict(word.split("=", 1) for word in shlex.split(args))
        elif keyword == "WORKDIR":
            workdir = fs / args.lstrip("/") if args.startswith("/") else workdir / args
            workdir.mkdir(parents=True, exist_ok=True)
        elif keyword == "COPY":
            *sources, destination = [word for word in args.split() if not word.startswith("--")]
            assert destination.endswith("/"), f"the replay copies into folders only: {args}"
            for source in sources:
                copy_context(source, workdir / destination, patterns)
        elif keyword == "RUN" and "pip install" in args:
            if "TORCH_INDEX_URL" not in os.environ:
                args = re.sub(r"--index-url\s+\S+\s*", "", args)
            run_step(["/bin/sh", "-c", args], workdir, env)
    return workdir, env


def copy_context(source: str, destination: Path, patterns: list[str]) -> None:
    """COPY a file into a folder, or a folder's content into a folder, as `docker build` does."""
    base = ROOT / source
    assert base.exists(), f"COPY {source}: not in the build context, `docker build` fails"
    files = [
        file
        for file in ([base] if base.is_file() else sorted(base.rglob("*")))
        if file.is_file() and not dockerignored(file.relative_to(ROOT).as_posix(), patterns)
    ]
    assert files, f"COPY {source}: .dockerignore leaves nothing of it"
    for file in files:
        target = destination / (file.name if file == base else file.relative_to(base))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(file, target)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not (ROOT / "service" / "main.py").exists():
        pytest.fail("service/main.py does not exist yet")
    tmp = tmp_path_factory.mktemp("image")
    venv = tmp / "venv"
    run_step([sys.executable, "-m", "venv", str(venv)], tmp, dict(os.environ))
    workdir, env = replay_build(tmp / "fs", venv)
    run_step([str(venv / "bin" / "python"), "-m", "pip", "check"], tmp, env)
    assert not any(workdir.iterdir()), f"the image's run directory {workdir} is not empty"
    # No network, and no cache of this machine's to hide a download: a fresh home, tmp, tiktoken.
    env = {k: v for k, v in env.items() if not k.startswith(("XDG_", "HF_", "TORCH_HOME"))}
    for folder in ["home", "tmp", "tiktoken-cache"]:
        (tmp / folder).mkdir()
    env |= {"HOME": str(tmp / "home"), "TMPDIR": str(tmp / "tmp")}
    env |= {"TIKTOKEN_CACHE_DIR": str(tmp / "tiktoken-cache"), "HF_HUB_OFFLINE": "1"}
    env |= {"NO_PROXY": "", "no_proxy": ""}
    env |= {name: DEAD_PROXY for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]}
    env |= {name.lower(): DEAD_PROXY for name in ["HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"]}

    port = free_port()
    command = json.loads(only("CMD"))
    command[command.index("--host") + 1] = "127.0.0.1"
    command[command.index("--port") + 1] = str(port)
    command[0] = shutil.which(command[0], path=env["PATH"]) or command[0]
    assert command[0].startswith(str(venv)), f"{command[0]} is not the venv's"
    log_path = tmp / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log, stderr=log)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(base_url, process, log_path)
        yield Server(base_url, port, env, venv, workdir)
    finally:
        process.send_signal(signal.SIGTERM)  # what `docker stop` sends
        try:
            returncode = process.wait(timeout=10)  # docker stop's grace period
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            pytest.fail(f"the server ignored SIGTERM:\n{log_path.read_text()}")
    # uvicorn shuts down gracefully, then re-raises the signal: exit 0, or killed by SIGTERM.
    log = log_path.read_text()
    assert returncode in {0, -signal.SIGTERM}, f"the server exited with {returncode}:\n{log}"
    assert "Finished server process" in log, log


def wait_until_healthy(base_url: str, process: subprocess.Popen, log_path: Path) -> None:
    """Until /readyz is 200: the port opens before the warm-up, and /readyz is 503 meanwhile."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited with {process.returncode}:\n{log_path.read_text()}")
        try:
            status, _, body = get(f"{base_url}/readyz", timeout=2)
        except urllib.error.HTTPError as error:  # 503 while warming up
            assert error.code == 503, error
            time.sleep(0.5)
            continue
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)
            continue
        assert (status, json.loads(body)) == (200, {"status": "ready"}), body
        return
    pytest.fail(f"/readyz never answered 200 in {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()}")


def test_image_serves_healthz(server: Server) -> None:
    status, content_type, body = get(f"{server.base_url}/healthz")
    assert status == 200
    assert content_type.startswith("application/json")
    assert json.loads(body) == {"status": "ok"}


def test_image_imports_the_installed_code_not_the_checkout(server: Server) -> None:
    probe = "import attention, service.main; print(attention.__file__, service.main.__file__)"
    result = subprocess.run(
        [str(server.venv / "bin" / "python"), "-c", probe],
        cwd=server.workdir,
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    for path in result.stdout.split():
        assert Path(path).is_relative_to(server.venv), path


def test_image_serves_swagger_ui_offline(server: Server) -> None:
    status, content_type, body = get(f"{server.base_url}/docs")
    page = body.decode()
    assert status == 200
    assert content_type.startswith("text/html")
    assert "swagger" in page.lower()
    assert "cdn" not in page.lower()
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    assert assets, page
    for asset in assets:
        assert asset.startswith("/") and not asset.startswith("//"), f"remote asset {asset}"
        assert get(f"{server.base_url}{asset}")[0] == 200, asset


@pytest.mark.parametrize("source", ["Dockerfile", "docker-compose.yml"])
def test_image_healthchecks_pass(server: Server, source: str) -> None:
    if source == "Dockerfile":
        command = healthcheck_command()
    else:
        command = compose_service()["healthcheck"]["test"][1:]
    command = [arg.replace("127.0.0.1:8000", f"127.0.0.1:{server.port}") for arg in command]
    command[0] = str(server.venv / "bin" / command[0])
    # Healthchecks run inside the container, where no proxy variables are set.
    env = {k: v for k, v in server.env.items() if "proxy" not in k.lower()}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, result.stderr


def test_nginx_conf_balances_over_the_image(server: Server, tmp_path: Path) -> None:
    """The real nginx.conf, with the replica's address and the paths made local, proxies to the
    replayed image: readiness, a computation, the client's request id. Needs an nginx binary."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    if nginx is None:
        pytest.skip("no nginx binary here (apt-get install nginx)")
    port = free_port()
    conf = NGINX_CONF.read_text().replace("/tmp/", f"{tmp_path}/")
    conf = conf.replace("attention-replica:8000", f"127.0.0.1:{server.port}")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    (tmp_path / "nginx.conf").write_text(conf)
    command = [nginx, "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    check = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen([*command, "-g", "daemon off;"], stderr=subprocess.PIPE)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                status, _, body = get(f"{base_url}/readyz", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "nginx did not start"
                time.sleep(0.2)
        assert (status, json.loads(body)) == (200, {"status": "ready"})
        book = {"embeddings": [[0.43, 0.15, 0.89], [0.55, 0.87, 0.66]], "d_out": 2, "seed": 789}
        request = urllib.request.Request(
            f"{base_url}/attention/self-attention",
            data=json.dumps(book).encode(),
            headers={"Content-Type": "application/json", "X-Request-ID": "through-nginx"},
        )
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=30) as response:
            assert response.status == 200
            assert response.headers["x-request-id"] == "through-nginx"
            assert json.loads(response.read())["variant"] == "self-attention"
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=10)
    assert b"[emerg]" not in stderr, stderr.decode()
