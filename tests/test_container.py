"""The container recipe, read: the Dockerfile, docker-compose.yml and nginx.conf.

These checks need no Docker engine. `make test-container` builds the image and runs it for real
(tests/container/).
"""

import json
import re
import tomllib
import urllib.parse
from pathlib import Path

from ruamel.yaml import YAML  # installed with check-jsonschema

ROOT = Path(__file__).resolve().parents[1]
CMD = ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
READY_URL = "http://127.0.0.1:8000/readyz"
UID = "10001"


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


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions after its FROM, by the stage's name ("" for the last, the
    image itself)."""
    named: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for keyword, args in dockerfile():
        if keyword == "FROM":
            base, _, name = args.partition(" AS ")
            current = named.setdefault(name, [("FROM", base)])
        else:
            current.append((keyword, args))
    return named


def only(instruction: str) -> str:
    found = [args for keyword, args in dockerfile() if keyword == instruction]
    assert len(found) == 1, f"expected one {instruction}, found {found}"
    return found[0]


def healthcheck() -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options ({"interval": "5s", ...}) and its exec-form command."""
    options, _, command = only("HEALTHCHECK").partition(" CMD ")
    assert command, f"HEALTHCHECK needs an exec-form CMD: {options}"
    flags = dict(flag.removeprefix("--").split("=", 1) for flag in options.split())
    return flags, json.loads(command)


def seconds(duration: str) -> float:
    """A Docker duration as the Dockerfile and compose write them: 5s, 1m30s, 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(number + unit for number, unit in parts) == duration, duration
    return sum(float(number) * units[unit] for number, unit in parts)


def runs() -> list[str]:
    return [args for keyword, args in dockerfile() if keyword == "RUN"]


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


def test_dockerfile_base_is_a_pinned_debian_release_with_its_python() -> None:
    # Debian 12 by name: its stable updates move the base, a new Debian or Python release never.
    # The build stage compiles the small path's kernel against that same Python.
    assert set(stages()) == {"build", ""}
    for stage in stages().values():
        assert stage[0] == ("FROM", "debian:bookworm-slim")
        (apt,) = [args for keyword, args in stage if "apt-get install" in args]
        assert re.search(r"apt-get install .*\bpython3\b.*\bpython3-venv\b", apt), apt
        assert "rm -rf /var/lib/apt/lists/*" in apt
    (build_apt,) = [args for _, args in stages()["build"] if "apt-get install" in args]
    assert {"gcc", "python3-dev"} <= set(build_apt.split())
    (image_apt,) = [args for _, args in stages()[""] if "apt-get install" in args]
    assert not {"gcc", "python3-dev"} & set(image_apt.split()), "no compiler in the image"
    env = " ".join(args for keyword, args in dockerfile() if keyword == "ENV")
    assert "VIRTUAL_ENV=/opt/venv" in env and "PATH=/opt/venv/bin:$PATH" in env
    assert 'RUN python3 -m venv "$VIRTUAL_ENV"' in [f"RUN {run}" for run in runs()]


def test_dockerfile_user_command_and_healthcheck() -> None:
    assert only("EXPOSE") == "8000 8001"  # HTTP, and the inference protocol's gRPC
    assert json.loads(only("CMD")) == CMD
    env = " ".join(args for keyword, args in dockerfile() if keyword == "ENV")
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "PYTHONUNBUFFERED=1" in env
    assert only("USER") == UID, "numeric, so that runAsNonRoot can verify it"
    # An ordinary account (uid 10001 is past the system range) with a home that exists.
    (useradd,) = [run for run in runs() if "useradd" in run]
    assert f"--uid {UID}" in useradd and "--system" not in useradd
    assert "--create-home" in useradd and "--home-dir /home/app" in useradd
    options, command = healthcheck()
    assert command[:2] == ["python", "-c"], command
    assert READY_URL in command[-1], "healthy must mean ready"
    # Docker 20.10 probes first one interval after the start; the service is ready in 4-7 s.
    assert seconds(options["interval"]) <= 5, "healthy within 15 s of the start"
    assert seconds(options["timeout"]) < seconds(options["interval"])
    assert seconds(options["start-period"]) >= 30, "a slow first start is not a failure"


def test_dockerfile_indexes_come_from_secrets_never_from_build_arguments() -> None:
    # An ARG's value is kept in `docker history`: a mirror's credentials would leak.
    assert "ARG" not in [keyword for keyword, _ in dockerfile()]
    for run in runs():
        if re.search(r"pip (install|wheel)", run):
            assert run.startswith("--mount=type=secret,id=pip.conf,target=/etc/pip.conf "), run
        if "apt-get" in run:
            target = "/etc/apt/sources.list.d/debian.sources"
            assert run.startswith(f"--mount=type=secret,id=apt-sources,target={target} "), run


def test_dockerfile_installs_pinned_cpu_torch_before_the_code() -> None:
    torch_installs = [run for run in runs() if re.search(r"pip install .*\btorch\b", run)]
    assert len(torch_installs) == 1, torch_installs
    (torch_install,) = torch_installs
    assert pyproject_torch_pin() in torch_install.split(), "the Dockerfile's torch pin drifted"
    # PyTorch's CPU index, unless a pip.conf secret says otherwise.
    default = "then export PIP_INDEX_URL=https://download.pytorch.org/whl/cpu; fi"
    assert f"if [ ! -s /etc/pip.conf ]; {default}" in torch_install
    # The build stage makes the project's wheel from the code alone (its dependencies are the
    # image's layers), non-editable.
    build = [f"{keyword} {args}" for keyword, args in stages()["build"]]
    code_copies = [
        i for i, step in enumerate(build) if re.match(r"COPY (attention|service)/", step)
    ]
    assert len(code_copies) == 2, "the build stage copies both packages"
    assert "COPY pyproject.toml setup.py README.md ./" in build, "and what the wheel needs"
    (wheel,) = [i for i, step in enumerate(build) if "pip wheel" in step]
    assert wheel > max(code_copies) and "--no-deps" in build[wheel].split()
    # In the image: torch, then the rest of the dependencies (pyproject.toml alone), then the
    # wheel, installed last: a change to the code rebuilds neither dependency layer.
    image = [f"{keyword} {args}" for keyword, args in stages()[""]]
    torch_step = image.index(f"RUN {torch_install}")
    wheel_copy = image.index("COPY --from=build /wheels/ /tmp/wheels/")
    assert torch_step < image.index("COPY pyproject.toml ./") < wheel_copy
    assert not any(re.match(r"COPY (attention|service)/", step) for step in image)
    (code_install,) = [i for i, step in enumerate(image) if "/tmp/wheels/*.whl" in step]
    assert code_install == wheel_copy + 1 and "--no-deps" in image[code_install].split()
    assert not any(re.search(r"\s-e\s|--editable", run) for run in runs())


def test_dockerignore_keeps_the_build_context_small_but_complete() -> None:
    patterns = dockerignore_patterns()
    needed_files = ["pyproject.toml", "setup.py", "README.md", "attention/small_kernel.c"]
    for needed in [*needed_files, "attention/__init__.py", "service/main.py"]:
        assert not dockerignored(needed, patterns), needed
    for unwanted in [".venv/bin/python", ".git/HEAD", "tests/test_container.py"]:
        assert dockerignored(unwanted, patterns), unwanted
    assert dockerignored("service/__pycache__/main.cpython-311.pyc", patterns)
    # The kernel is compiled for the image's Python, never copied from an editable install.
    assert dockerignored("attention/_small_kernel.cpython-311-x86_64-linux-gnu.so", patterns)


def test_compose_builds_the_image_publishes_8000_and_8001_and_checks_health() -> None:
    service = compose_service()
    build = service["build"]
    assert build["context"] in {".", "./"}
    assert build.get("dockerfile", "Dockerfile") == "Dockerfile"
    assert "args" not in build, "build arguments land in `docker history`: use secrets"
    ports = [str(port) for port in service["ports"]]
    for published in ("8000", "8001"):
        pattern = rf"(\S+:)?(\d+:)?{published}(/tcp)?"
        assert any(re.fullmatch(pattern, port) for port in ports), ports
    options, command = healthcheck()
    check = service["healthcheck"]
    assert check["test"] == ["CMD", *command], "compose and Dockerfile healthchecks differ"
    for option in ["interval", "timeout", "start-period", "retries"]:
        assert str(check[option.replace("-", "_")]) == options[option], option
    # Read-only, and nothing written at run time: no tmpfs either.
    assert service["read_only"] is True
    assert "tmpfs" not in service and "volumes" not in service
    assert service["cap_drop"] == ["ALL"]
    assert service["security_opt"] == ["no-new-privileges=true"], "dockerd deprecates `:`"
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
SCALE_COMMAND = "docker compose --profile scale up --scale attention-replica="


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
    assert [str(port) for port in replica["expose"]] == ["8000", "8001"]
    for key in ["image", "healthcheck", "read_only", "cap_drop", "security_opt", "restart"]:
        assert replica[key] == single[key], key
    assert replica["environment"]["ATTENTION_TORCH_THREADS"] == "1", "one core per replica"
    assert "profiles" not in single, "`docker compose up` still starts the single service"


def test_compose_builds_the_image_once() -> None:
    """Two services that build one tag build it twice, and leave the first image dangling."""
    services = compose()["services"]
    assert [name for name, service in services.items() if "build" in service] == ["attention"]
    replica = services["attention-replica"]
    assert replica["pull_policy"] == "never", "the image is `attention`'s, in no registry"
    header = (ROOT / "docker-compose.yml").read_text()
    assert "docker compose build" in header, "say how the replicas' image is built"


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
