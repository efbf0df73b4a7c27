"""Configuration files: TOML loading, strictness, the command line winning, and the CLI's
one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from moe2.cli import agent as agent_cli
from moe2.cli.main import build_parser, main
from moe2.shared.config import (
    AgentConfig,
    ConfigError,
    CoordinatorConfig,
    MeterSection,
    load,
    override,
)
from moe2.tools.fleet.harness import moe2_argv

AGENT_TOML = """
id = "edge-1"
model = "{model}"
broker = "mqtts://user:secret@broker.example:8883"
root = "site7"
n_ctx = 1024
n_threads = 6
kv_type = "q8_0"
max_sessions = 8
idle_timeout_s = 30.5
telemetry_interval_s = 1.5

[meter]
kind = "estimated"
estimated_watts = 22.5
rails = ["VDD_IN"]

[tls]
ca_file = "/etc/moe2/ca.pem"
"""


@pytest.fixture(scope="module")
def model(tiny_model: Path) -> Path:
    return tiny_model


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_agent_toml_loads_every_section(tmp_path: Path, model: Path) -> None:
    cfg = load(write(tmp_path, AGENT_TOML.format(model=model)), AgentConfig).validate()
    assert (cfg.id, cfg.model, cfg.root) == ("edge-1", str(model), "site7")
    assert cfg.broker == "mqtts://user:secret@broker.example:8883"
    assert (cfg.n_ctx, cfg.n_threads, cfg.kv_type, cfg.max_sessions) == (1024, 6, "q8_0", 8)
    assert (cfg.idle_timeout_s, cfg.telemetry_interval_s) == (30.5, 1.5)
    assert cfg.meter == MeterSection(kind="estimated", estimated_watts=22.5, rails=["VDD_IN"])
    assert cfg.tls.ca_file == "/etc/moe2/ca.pem"
    # untouched keys keep their defaults
    assert cfg.n_gpu_layers == 0
    assert cfg.flash_attn is False
    assert cfg.tls.insecure is False


def test_no_file_means_defaults() -> None:
    assert load(None, AgentConfig) == AgentConfig()
    assert load(None, CoordinatorConfig) == CoordinatorConfig()


@pytest.mark.parametrize(("text", "needle"), [
    ('id = "a"\nmodle = "x.gguf"\n', "modle"),
    ('id = "a"\n[meter]\nkind = "estimated"\nwatts = 3\n', "watts"),
    ('id = "a"\n[gpu]\nindex = 0\n', "gpu"),
    ('n_ctx = "big"\n', "n_ctx"),
    ('kv_type = "q4_0"\n', "kv_type"),
    ('[meter]\nkind = "psu"\n', "kind"),
    ('id = "a\n', "TOML"),
])
def test_bad_agent_toml_is_one_config_error(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), AgentConfig)
    msg = str(info.value)
    assert needle in msg
    assert "\n" not in msg


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load(tmp_path / "nope.toml", AgentConfig)


@pytest.mark.parametrize(("changes", "needle"), [
    ({"id": ""}, "agent id is required"),
    ({"model": ""}, "model is required"),
    ({"model": "/nonexistent/x.gguf"}, "does not exist"),
    ({"n_ctx": 0}, "n_ctx"),
    ({"max_sessions": -1}, "max_sessions"),
    ({"idle_timeout_s": 0.0}, "idle_timeout_s"),
    ({"max_prompt_tokens": 0}, "max_prompt_tokens"),
])
def test_agent_validate(model: Path, changes: dict[str, object], needle: str) -> None:
    cfg = override(AgentConfig(id="a", model=str(model)), **changes)
    with pytest.raises(ConfigError, match=needle):
        cfg.validate()


def test_override_ignores_none_and_rejects_unknown_names() -> None:
    cfg = AgentConfig(id="a", n_ctx=512)
    assert override(cfg, n_ctx=None, id=None) == cfg
    assert override(cfg, n_ctx=64).n_ctx == 64
    with pytest.raises(ConfigError):
        override(cfg, n_ctxx=64)


def parse(*argv: str) -> AgentConfig:
    args = build_parser().parse_args(["agent", *argv])
    return agent_cli.build_config(args)


def test_command_line_wins_over_file(tmp_path: Path, model: Path) -> None:
    f = write(tmp_path, AGENT_TOML.format(model=model))
    cfg = parse("--config", str(f), "--id", "edge-2", "--n-ctx", "256", "--broker",
                "mqtt://127.0.0.1:1884", "--meter", "estimated", "--estimated-watts", "7",
                "--kv-type", "f32", "--ca-file", "/tmp/ca.pem")
    assert (cfg.id, cfg.n_ctx, cfg.broker, cfg.kv_type) == (
        "edge-2", 256, "mqtt://127.0.0.1:1884", "f32")
    assert cfg.meter.estimated_watts == 7.0
    assert cfg.tls.ca_file == "/tmp/ca.pem"
    # what the command line did not say comes from the file
    assert (cfg.root, cfg.n_threads, cfg.max_sessions, cfg.telemetry_interval_s) == (
        "site7", 6, 8, 1.5)
    assert cfg.meter.rails == ["VDD_IN"]
    # and the file alone gives the file's values
    assert parse("--config", str(f)).n_ctx == 1024


def test_flags_work_without_a_config_file(model: Path) -> None:
    cfg = parse("--broker", "mqtt://10.0.0.2:1883", "--id", "e0", "--model", str(model))
    assert (cfg.broker, cfg.id, cfg.model) == ("mqtt://10.0.0.2:1883", "e0", str(model))
    assert cfg.n_ctx == AgentConfig().n_ctx


def test_agent_id_must_be_a_topic_level(model: Path) -> None:
    for bad in ("a/b", "a+", "#", "x" * 65):
        with pytest.raises(ConfigError, match="agent id"):
            parse("--id", bad, "--model", str(model))


def run_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as info:
        main(list(argv))
    code = info.value.code
    assert isinstance(code, int)
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("moe2: error: ")
    return lines[0]


def test_cli_bad_config_exits_2_with_one_line(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    f = write(tmp_path, 'id = "a"\nbogus_key = 1\n')
    code, err = run_main(capsys, "agent", "--config", str(f))
    assert code == 2
    assert "bogus_key" in one_error_line(err)


def test_cli_missing_model_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(capsys, "agent", "--broker", "mqtt://127.0.0.1:1", "--id", "e0",
                         "--model", str(tmp_path / "absent.gguf"))
    assert code == 2
    line = one_error_line(err)
    assert "absent.gguf" in line
    assert "does not exist" in line


def test_cli_bad_broker_url_exits_2(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_main(capsys, "agent", "--broker", "http://127.0.0.1:1883", "--id", "e0",
                         "--model", str(model))
    assert code == 2
    assert "mqtt://" in one_error_line(err)


def test_cli_not_a_gguf_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    code, err = run_main(capsys, "agent", "--broker", "mqtt://127.0.0.1:1", "--id", "e0",
                         "--model", str(junk))
    assert code == 2
    assert "junk.gguf" in one_error_line(err)


def test_console_bad_config_exits_2_with_one_stderr_line(tmp_path: Path) -> None:
    """The real process: nothing but one error line, no traceback."""
    f = write(tmp_path, 'id = "a"\n[meter]\nkind = "estimated"\nunknown = true\n')
    proc = subprocess.run([*moe2_argv(), "agent", "--config", str(f)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    line = one_error_line(proc.stderr)
    assert "unknown" in line
    assert str(f) in line
    assert proc.stdout == ""


# --------------------------------------------------------------------------- coordinator


def test_coordinator_toml(tmp_path: Path) -> None:
    f = write(tmp_path, """
id = "c1"
dist_k = 0
[apps.chat]
max_latency_s = 0.25
[apps.code]
max_latency_s = 0.5
top_k = 2
[planner]
method = "exact"
max_energy_j = 3.5
""", "coord.toml")
    cfg = load(f, CoordinatorConfig).validate()
    assert (cfg.id, cfg.dist_k) == ("c1", 0)
    assert cfg.apps["chat"].max_latency_s == 0.25
    assert cfg.apps["code"].top_k == 2
    assert (cfg.planner.method, cfg.planner.max_energy_j) == ("exact", 3.5)


@pytest.mark.parametrize(("text", "needle"), [
    ("dist_k = -1\n", "dist_k"),
    ("[apps.chat]\nmax_latency_s = 0\n", "apps.chat.max_latency_s"),
    ("[planner]\nmethod = \"magic\"\n", "method"),
    ("[apps.chat]\nlatency = 1\n", "latency"),
    ('gate = "/nonexistent/gate.onnx"\n', "gate"),
    ("[planner]\nstep_overhead_s = -0.001\n", "step_overhead_s"),
    ("[planner]\nstep_overhead_s = nan\n", "step_overhead_s"),
    ("[planner]\ntime_limit_s = 0\n", "time_limit_s"),
    ("[planner]\ntime_limit_s = inf\n", "time_limit_s"),
])
def test_bad_coordinator_toml(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load(write(tmp_path, text, "coord.toml"), CoordinatorConfig).validate()
