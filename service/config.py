"""The server's one typed configuration, fed by CLI flags and CHAT_* environment variables."""

from __future__ import annotations

import argparse
import enum
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

ENV_PREFIX = "CHAT_"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "chat-v1"  # --cache-dir when left empty


class Dtype(str, enum.Enum):
    """What the model computes in (--dtype)."""

    AUTO = "auto"  # see service/models/quant/precision.py: what fits and runs fast here
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


class Quantization(str, enum.Enum):
    """How linear weights are stored (--quantize)."""

    AUTO = "auto"  # a GGUF file's own 4-bit layers as packed int4; other models as they are
    NONE = "none"  # dense weights in the compute dtype (a GGUF file is dequantized)
    INT8 = "int8"
    INT4 = "int4"


class Compile(str, enum.Enum):
    """Decode steps made once and replayed (--compile); `--compile` alone means ON, `--no-compile` OFF."""

    AUTO = "auto"  # on a GPU inductor then CUDA graphs (graphs alone if inductor fails); nothing on a CPU
    ON = "on"  # inductor (then CUDA graphs on a GPU), with no fallback
    GRAPHS = "graphs"  # CUDA graphs of the eager step, no inductor (CUDA only)
    OFF = "off"


class CpuKernels(str, enum.Enum):
    """Which CPU kernels run packed int4/int8 layers and a decode step's small ops (--cpu-kernels)."""

    AUTO = "auto"  # our own C++ kernels where they build and run here (AVX2 and a compiler), else torch's
    TORCH = "torch"  # torch's kernels always (A/B comparisons)


# enum fields that also work as on/off switches: `--name` alone means on, `--no-name` off
SWITCHES = {"compile": Compile}
AUTO_SIZES = {"kv_cache_tokens"}  # integer settings that also take `auto`, held as 0
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass(frozen=True)
class SamplingDefaults:
    """What a request gets for each sampling field it leaves unset. api.py's defaults."""

    max_length: int = 2048
    max_new_tokens: int = 1024
    temperature: float = 0.95
    top_p: float = 0.7
    top_k: int = 0
    repetition_penalty: float = 1.0

    def for_model(self, model_max_length: int | None) -> SamplingDefaults:
        """These defaults with the checkpoint's own max_length (LoadedModel.default_max_length, e.g. 32768 for
        chatglm2-6b-32k) where --max-length was left at api.py's 2048."""
        if model_max_length is None or self.max_length != SamplingDefaults.max_length:
            return self
        return replace(self, max_length=model_max_length)


@dataclass(frozen=True)
class Limits:
    """Bounds that keep one request, or many, from exhausting the server."""

    max_batch_size: int = 32  # requests decoded together in one step
    max_queued_requests: int = 256  # running plus waiting; more get RESOURCE_EXHAUSTED
    kv_cache_tokens: int = 65536  # KV positions in all, a pool of 16-position blocks; 0 (`auto`): sized on CUDA
    max_model_len: int = 0  # the longest prompt + answer one request may have; 0: the model's context (or the pool)
    prefix_cache_tokens: int = 8192  # 0 turns prefix caching off; else full blocks of finished prompts are kept
    prefill_chunk_tokens: int = 512  # prompt tokens computed per step; longer prompts take several steps
    max_prompt_chars: int = 100_000  # prompt plus history plus system, in characters
    max_history_turns: int = 256
    max_stop_strings: int = 8
    max_stop_chars: int = 64
    max_n: int = 8  # answers one request may ask for (params.n); they share the prompt's KV
    max_constraint_bytes: int = 65536  # a structured-output constraint's size (schema, regex, grammar, choices)
    max_message_bytes: int = 4 * 1024 * 1024  # gRPC receive and send limit


@dataclass(frozen=True)
class ServerConfig:
    """Everything `chat-server` can be told. Flags win over environment variables, which win over defaults."""

    model: str = ""  # a HF model directory, a .gguf file, or "" for the embedded default
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: Dtype = Dtype.AUTO
    quantize: Quantization = Quantization.AUTO
    compile: Compile = Compile.AUTO
    cpu_kernels: CpuKernels = CpuKernels.AUTO
    cache_dir: str = ""  # the one cache root (converted tokenizers, built kernels); "" is ~/.cache/chat-v1
    kernel_dir: str = ""  # where our CPU kernels are built and loaded from; "" is <cache dir>/kernels/torch-<ver>
    host: str = "127.0.0.1"
    port: int = 50051
    threads: int = 0  # torch CPU threads; 0 means one per core
    grace_seconds: float = 10.0  # how long in-flight requests may finish on SIGTERM
    log_level: str = "INFO"
    log_prompts: bool = False  # prompt text stays out of the logs unless asked for
    reflection: bool = True  # gRPC server reflection (grpcurl without a .proto); --no-reflection turns it off
    tls_cert: str = ""  # PEM certificate chain file; with tls_key, serve TLS instead of plaintext
    tls_key: str = ""  # PEM private key file
    tls_client_ca: str = ""  # PEM CA bundle; when set, clients must present a certificate it signed (mTLS)
    auth_token: str = ""  # when set, calls must carry `authorization: Bearer <token>` (health stays open)
    auth_token_file: str = ""  # the same token read from a file (first line), kept out of ps and the environment
    http: bool = True  # the HTTP listener (GET /metrics, JSON routes); --no-http turns it off
    http_port: int = 8080  # its port on --host; 0 picks a free one (logged: `http listening on HOST:PORT`)
    http_body_timeout_seconds: float = 10.0  # an HTTP API request's body must arrive within this, else 408
    metrics: bool = True  # Prometheus metrics on GET /metrics; --no-metrics records nothing
    health_port: int = 0  # a second, plaintext, token-free port serving only grpc.health.v1; 0 means none
    drain_delay_seconds: float = 0.0  # on SIGTERM: NOT_SERVING, then wait this long before refusing calls
    otlp_endpoint: str = ""  # OpenTelemetry traces to this OTLP/gRPC endpoint (needs `pip install .[otel]`)
    defaults: SamplingDefaults = field(default_factory=SamplingDefaults)
    limits: Limits = field(default_factory=Limits)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"not a boolean: {text!r}")


class _BadChoice(argparse.ArgumentTypeError, ValueError):
    """A value outside an enum's choices; argparse and the environment both show its message as it is."""


def _parse_size(text: str) -> int:
    """An integer, or `auto` (held as 0)."""
    return 0 if text.strip().lower() == "auto" else int(text)


def _converter(kind: type, name: str = ""):
    if kind is bool:
        return _parse_bool
    if name in AUTO_SIZES:
        return _parse_size
    if issubclass(kind, enum.Enum):
        def convert(text: str):
            try:
                return kind(text.strip().lower())
            except ValueError:
                raise _BadChoice(f"{_flag(name)} must be {_choices(kind)}, got {text!r}") from None

        return convert
    return kind


def _choices(kind: type[enum.Enum]) -> str:
    names = [m.value for m in kind]
    return ", ".join(names[:-1]) + " or " + names[-1]


def _sections() -> list[tuple[str | None, type]]:
    """The config's flat fields (None) and its nested groups, each with its dataclass."""
    return [(None, ServerConfig), ("defaults", SamplingDefaults), ("limits", Limits)]


def _leaf_fields(cls: type):
    return [f for f in fields(cls) if f.name not in ("defaults", "limits")]


def build_parser() -> argparse.ArgumentParser:
    """Flags for every config field; each also reads CHAT_<FIELD> from the environment."""
    parser = argparse.ArgumentParser(
        prog="chat-server",
        description="Serve a chat LLM over gRPC (chat.v1.ChatService).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    for section, cls in _sections():
        group = parser.add_argument_group(section or "server")
        for f in _leaf_fields(cls):
            kind = type(f.default)
            dest = f"{section}.{f.name}" if section else f.name
            help_text = f"env {ENV_PREFIX}{f.name.upper()} (default {f.default!r})"
            if issubclass(kind, enum.Enum):
                help_text = f"{'|'.join(m.value for m in kind)}; env {ENV_PREFIX}{f.name.upper()} (default " \
                            f"{f.default.value})"
            if f.name in SWITCHES:  # `--compile` (on), `--compile MODE` and `--no-compile` (off)
                group.add_argument(_flag(f.name), dest=dest, nargs="?", const=kind("on"), default=None,
                                   type=_converter(kind, f.name), metavar="MODE", help=help_text)
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=dest, action="store_const",
                                   const=kind("off"), help=f"same as {_flag(f.name)} off")
                continue
            if kind is bool:  # `--name`, `--name false` and `--no-name` all work
                group.add_argument(_flag(f.name), dest=dest, type=_parse_bool, nargs="?", const=True, default=None,
                                   metavar="BOOL", help=help_text)
                group.add_argument("--no-" + f.name.replace("_", "-"), dest=dest, action="store_const", const=False,
                                   help=f"same as {_flag(f.name)} false")
                continue
            group.add_argument(
                _flag(f.name),
                dest=dest,
                type=_converter(kind, f.name),
                default=None,
                metavar="MODE" if issubclass(kind, enum.Enum) else kind.__name__.upper(),
                help=help_text,
            )
    return parser


def load_config(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """Build the config from flags, then CHAT_* variables, then defaults. Bad values exit with usage."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    env = os.environ if environ is None else environ
    values: dict[str | None, dict[str, object]] = {}
    for section, cls in _sections():
        chosen: dict[str, object] = {}
        for f in _leaf_fields(cls):
            flag_value = args[f"{section}.{f.name}" if section else f.name]
            env_value = env.get(ENV_PREFIX + f.name.upper())
            if flag_value is not None:
                chosen[f.name] = flag_value
            elif env_value is not None:
                try:
                    chosen[f.name] = _converter(type(f.default), f.name)(env_value)
                except ValueError as err:
                    parser.error(f"{ENV_PREFIX}{f.name.upper()}={env_value!r}: {err}")
        values[section] = chosen
    config = ServerConfig(
        **values[None],
        defaults=SamplingDefaults(**values["defaults"]),
        limits=Limits(**values["limits"]),
    )
    problem = check_config(config)
    if problem:
        parser.error(problem)
    return config


def check_config(config: ServerConfig) -> str | None:
    """The first thing wrong with a config, or None."""
    d, lim = config.defaults, config.limits
    checks = [
        (0 <= config.port <= 65535, f"--port must be in [0, 65535], got {config.port}"),
        (0 <= config.http_port <= 65535, f"--http-port must be in [0, 65535], got {config.http_port}"),
        (config.http_body_timeout_seconds > 0,
         f"--http-body-timeout-seconds must be > 0, got {config.http_body_timeout_seconds}"),
        (0 <= config.health_port <= 65535, f"--health-port must be in [0, 65535], got {config.health_port}"),
        (config.drain_delay_seconds >= 0, f"--drain-delay-seconds must be >= 0, got {config.drain_delay_seconds}"),
        (DEVICE.fullmatch(config.device) is not None,
         f"--device must be auto, cpu, cuda or cuda:N, got {config.device!r}"),
        (d.max_length > 0, f"--max-length must be > 0, got {d.max_length}"),
        (d.max_new_tokens > 0, f"--max-new-tokens must be > 0, got {d.max_new_tokens}"),
        (d.temperature >= 0, f"--temperature must be >= 0, got {d.temperature}"),
        (0 < d.top_p <= 1, f"--top-p must be in (0, 1], got {d.top_p}"),
        (d.top_k >= 0, f"--top-k must be >= 0, got {d.top_k}"),
        (d.repetition_penalty > 0, f"--repetition-penalty must be > 0, got {d.repetition_penalty}"),
        (lim.max_batch_size > 0, f"--max-batch-size must be > 0, got {lim.max_batch_size}"),
        (lim.max_queued_requests >= lim.max_batch_size,
         f"--max-queued-requests must be >= --max-batch-size, got {lim.max_queued_requests}"),
        (lim.kv_cache_tokens == 0 or lim.kv_cache_tokens >= 2 * lim.max_batch_size,
         f"--kv-cache-tokens must be auto or at least 2 per batch row ({2 * lim.max_batch_size}), got "
         f"{lim.kv_cache_tokens}"),
        (lim.prefill_chunk_tokens > 0, f"--prefill-chunk-tokens must be > 0, got {lim.prefill_chunk_tokens}"),
        (lim.max_model_len >= 0, f"--max-model-len must be >= 0 (0: the model's context), got {lim.max_model_len}"),
        (lim.prefix_cache_tokens >= 0, f"--prefix-cache-tokens must be >= 0, got {lim.prefix_cache_tokens}"),
        (config.grace_seconds >= 0, f"--grace-seconds must be >= 0, got {config.grace_seconds}"),
        (lim.max_n >= 1, f"--max-n must be >= 1, got {lim.max_n}"),
        (lim.max_constraint_bytes > 0, f"--max-constraint-bytes must be > 0, got {lim.max_constraint_bytes}"),
        (lim.max_message_bytes > 0, f"--max-message-bytes must be > 0, got {lim.max_message_bytes}"),
        (bool(config.tls_cert) == bool(config.tls_key), "--tls-cert and --tls-key must be given together"),
        (not config.tls_client_ca or bool(config.tls_cert), "--tls-client-ca needs --tls-cert and --tls-key"),
        (not (config.auth_token and config.auth_token_file), "give --auth-token or --auth-token-file, not both"),
    ]
    for name in ("tls_cert", "tls_key", "tls_client_ca", "auth_token_file"):
        path = getattr(config, name)
        checks.append((not path or os.path.isfile(path), f"{_flag(name)}: no such file: {path!r}"))
    return next((message for ok, message in checks if not ok), None)


def cache_root(config: ServerConfig) -> Path:
    """The one cache directory: converted tokenizers, built kernels."""
    return Path(config.cache_dir).expanduser() if config.cache_dir else DEFAULT_CACHE_DIR


def read_auth_token(config: ServerConfig) -> str:
    """The bearer token callers must present, or "" for none."""
    if config.auth_token_file:
        with open(config.auth_token_file, encoding="utf-8") as f:
            token = f.readline().strip()
        if not token:
            raise ValueError(f"--auth-token-file {config.auth_token_file!r} is empty")
        return token
    return config.auth_token
