"""Wire codec, error mapping, settings from the environment, and NATS subject names."""

from __future__ import annotations

import json
import os

import msgpack
import pytest
from pydantic import ValidationError

from services.common import subjects
from services.common.codec import CodecError, decode, encode, unpack, validation_error
from services.common.schemas import (
    HTTP_STATUS,
    SCHEMA_VERSION,
    ChatMessage,
    CompletionRecord,
    EmbedRequest,
    ErrorCode,
    ErrorInfo,
    GenerateRequest,
    Job,
    JobKind,
    Prediction,
    StepTelemetry,
)
from services.common.settings import GroupSpec, ModelSpec, PredictorSettings, SchedulerSettings, Settings
from services.gateway.openai_api import CompletionBody


def pack(obj: object) -> bytes:
    """Raw msgpack of any object (bypasses the schemas)."""
    data = msgpack.packb(obj, use_bin_type=True)
    assert isinstance(data, bytes)
    return data


def make_generate(**kw: object) -> GenerateRequest:
    """A chat generate request; keyword arguments override fields."""
    fields: dict[str, object] = {
        "request_id": "req-1",
        "model": "m1",
        "messages": [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")],
        "max_tokens": 12,
        "stop": ["\n\n"],
        "seed": 7,
        "stream": True,
    }
    fields.update(kw)
    return GenerateRequest.model_validate(fields)


def make_job(**kw: object) -> Job:
    """A job wrapping make_generate(), with a prediction."""
    fields: dict[str, object] = {
        "request_id": "req-1",
        "kind": JobKind.GENERATE,
        "model": "m1",
        "group": "chat",
        "reply_to": "_INBOX.abc",
        "headers": {"traceparent": "00-abc-def-01"},
        "generate": make_generate(),
        "prediction": Prediction(length_class=2, predicted_tokens=300.0, predictor="per-model-median@1"),
        "predicted_exec_ms": 1234.5,
        "accepted_at_s": 1_700_000_000.25,
        "deadline_s": 1_700_000_300.25,
        "attempt": 2,
    }
    fields.update(kw)
    return Job.model_validate(fields)


# -- codec -----------------------------------------------------------------------------------------


def test_round_trip_generate_request() -> None:
    msg = make_generate()
    back = decode(GenerateRequest, encode(msg))
    assert back == msg
    assert back.prompt is None and back.prompt_text() == "be brief\nhi"


def test_round_trip_nested_job() -> None:
    job = make_job()
    back = decode(Job, encode(job))
    assert back == job
    assert back.generate is not None and back.generate.messages is not None
    assert back.generate.messages[1].content == "hi"
    assert back.kind is JobKind.GENERATE and back.v == SCHEMA_VERSION


def test_encode_drops_none_fields() -> None:
    raw = unpack(encode(make_generate(seed=None)))
    assert isinstance(raw, dict)
    assert "seed" not in raw and "prompt" not in raw and "timeout_s" not in raw
    assert raw["max_tokens"] == 12


def test_decode_applies_overrides() -> None:
    job = decode(Job, encode(make_job()), attempt=5)
    assert job.attempt == 5


@pytest.mark.parametrize("data", [b"\xc1", b"\x92\x01", b""])
def test_invalid_msgpack_is_a_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError, match="not valid msgpack") as exc:
        decode(GenerateRequest, data)
    err = exc.value.to_error()
    assert err.code is ErrorCode.INVALID_REQUEST and err.param is None


@pytest.mark.parametrize("payload", [[1, 2], "prompt", 42, None])
def test_non_map_payload_is_a_codec_error(payload: object) -> None:
    with pytest.raises(CodecError, match="must be a msgpack map"):
        decode(GenerateRequest, pack(payload))


def test_wrong_type_names_the_field() -> None:
    with pytest.raises(CodecError) as exc:
        decode(GenerateRequest, pack({"prompt": 5}))
    assert exc.value.param == "prompt"
    assert str(exc.value).startswith("prompt: ")
    err = exc.value.to_error()
    assert err.param == "prompt" and err.http_status == 400


def test_nested_error_location_is_dotted() -> None:
    data = unpack(encode(make_job()))
    data["generate"]["max_tokens"] = 0
    with pytest.raises(CodecError) as exc:
        decode(Job, pack(data))
    assert exc.value.param == "generate.max_tokens"
    data["generate"]["max_tokens"] = 5
    data["generate"]["stop"] = ["ok", 3]
    with pytest.raises(CodecError) as exc:
        decode(Job, pack(data))
    assert exc.value.param == "generate.stop.1"


def test_union_type_tags_are_stripped_from_the_location() -> None:
    """pydantic reports ("prompt", "str") and ("prompt", "list[str]") for a `str | list[str]` field."""
    with pytest.raises(ValidationError) as exc:
        CompletionBody.model_validate({"model": "m", "prompt": 5})
    assert exc.value.errors()[0]["loc"] == ("prompt", "str")
    err = validation_error(exc.value)
    assert err.param == "prompt"
    assert str(err).startswith("prompt: ")


def test_missing_required_field_is_named() -> None:
    with pytest.raises(CodecError) as exc:
        decode(EmbedRequest, pack({"model": "m"}))
    assert exc.value.param == "input"


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0])
def test_unknown_schema_version_is_rejected(version: int) -> None:
    with pytest.raises(CodecError, match="unsupported schema version") as exc:
        decode(GenerateRequest, pack({"v": version, "prompt": "hi"}))
    assert exc.value.param is None


def test_nested_unknown_version_is_rejected() -> None:
    data = unpack(encode(make_job()))
    data["generate"]["v"] = SCHEMA_VERSION + 1
    with pytest.raises(CodecError, match="unsupported schema version"):
        decode(Job, pack(data))


def test_extra_keys_are_ignored() -> None:
    msg = decode(GenerateRequest, pack({"prompt": "hi", "future_field": {"x": 1}, "n": 3}))
    assert msg.prompt == "hi"
    assert not hasattr(msg, "future_field")
    job_data = unpack(encode(make_job()))
    job_data["priority"] = "high"
    assert decode(Job, pack(job_data)) == make_job()


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]},
    ],
)
def test_exactly_one_of_prompt_or_messages(fields: dict[str, object]) -> None:
    with pytest.raises(CodecError, match="exactly one of 'prompt' or 'messages'"):
        decode(GenerateRequest, pack(fields))


def test_prompt_or_messages_alone_are_accepted() -> None:
    assert decode(GenerateRequest, pack({"prompt": ""})).prompt_text() == ""
    chat = decode(GenerateRequest, pack({"messages": [{"role": "user", "content": "yo"}]}))
    assert chat.prompt_text() == "yo"


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(CodecError, match="stop strings must be non-empty"):
        decode(GenerateRequest, pack({"prompt": "x", "stop": [""]}))


def test_request_ids_are_fresh_hex() -> None:
    a, b = GenerateRequest(prompt="x"), GenerateRequest(prompt="x")
    assert a.request_id != b.request_id
    assert len(a.request_id) == 32 and int(a.request_id, 16) >= 0


def test_completion_record_without_prediction_round_trips() -> None:
    """A job dispatched before its prediction arrived publishes prediction=None (worker/service.py)."""
    rec = CompletionRecord(
        request_id="r",
        model="m1",
        prompt_tokens=3,
        completion_tokens=40,
        finish_reason="stop",
        prediction=None,
        queue_ms=1.0,
        exec_ms=2.0,
    )
    assert decode(CompletionRecord, encode(rec)) == rec


def test_idle_step_telemetry_round_trips() -> None:
    """A worker with no decode step in an interval publishes p50_step_ms=max_step_ms=None."""
    tel = StepTelemetry(
        worker_id="w1",
        node="n",
        gpu=0,
        ts_s=1.0,
        interval_ms=500.0,
        steps=0,
        busy_ms=0.0,
        tokens=0,
        mean_batch=0.0,
        p50_step_ms=None,
        max_step_ms=None,
        slowdown=1.0,
    )
    assert decode(StepTelemetry, encode(tel)) == tel


EXPECTED_STATUS = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.UNKNOWN_MODEL: 404,
    ErrorCode.CONTEXT_LENGTH: 413,
    ErrorCode.QUEUE_FULL: 429,
    ErrorCode.NO_WORKER: 503,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.WORKER_LOST: 503,
    ErrorCode.CANCELLED: 499,
    ErrorCode.INTERNAL: 500,
}


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_has_its_http_status(code: ErrorCode) -> None:
    assert ErrorInfo(code=code, message="x").http_status == EXPECTED_STATUS[code]


def test_http_status_table_covers_exactly_the_codes() -> None:
    assert set(HTTP_STATUS) == set(ErrorCode) == set(EXPECTED_STATUS)


def test_error_info_round_trips_by_value() -> None:
    err = ErrorInfo.model_validate({"code": "queue_full", "message": "busy"})
    assert err.code is ErrorCode.QUEUE_FULL and err.param is None


# -- settings --------------------------------------------------------------------------------------


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No MUSERVE_ variable from the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.upper().startswith("MUSERVE_"):
            monkeypatch.delenv(key)
    return monkeypatch


def chat_model(name: str = "m1", group: str = "chat") -> ModelSpec:
    """A minimal chat model spec."""
    return ModelSpec(name=name, kind="chat", source="smollm2", group=group, max_context_tokens=2048)


def test_a_model_can_be_predicted_as_another_llm(clean_env: pytest.MonkeyPatch) -> None:
    """predict_as: the name the length predictor is asked about (any LLM name, dots included)."""
    alias = chat_model("vicuna-13b-fcfs").model_copy(update={"predict_as": "vicuna-13b-v1.5"})
    s = Settings(models=[alias, chat_model("plain")], groups={"chat": GroupSpec()})
    assert s.length_model("vicuna-13b-fcfs") == "vicuna-13b-v1.5"
    assert s.length_model("plain") == "plain" and s.length_model("not-served") == "not-served"


def test_default_settings_are_consistent(clean_env: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert s.nats_url == "nats://127.0.0.1:14222"
    assert set(s.groups) == {"chat", "embed"}
    assert s.groups["chat"].policy == "ssjf" and s.groups["embed"].policy == "fcfs"
    assert [m.name for m in s.models_in("chat")] == ["smollm2-135m-instruct"]
    assert s.model("all-minilm-l6-v2") is not None and s.model("nope") is None
    # The baseline numbers classes like the shipped proxy artifact does.
    from services.predictor.proxy import ProxyLengthPredictor

    assert s.predictor.edges_tokens == ProxyLengthPredictor.load().edges_tokens
    assert s.worker.max_seqs == 8 and s.scheduler.max_attempts == 3
    subjects.check_token(s.node)


def test_env_overrides_with_prefix_and_nesting(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MUSERVE_WORKER__MAX_SEQS", "3")
    clean_env.setenv("MUSERVE_SCHEDULER__WORKER_LEASE_MS", "1500")
    clean_env.setenv("MUSERVE_NATS_URL", "nats://10.0.0.1:4222")
    clean_env.setenv("MUSERVE_NODE", "gpu.box.7")
    clean_env.setenv("WORKER__MAX_SEQS", "99")  # no prefix: ignored
    s = Settings()
    assert s.worker.max_seqs == 3
    assert s.worker.dtype == "bfloat16"  # siblings keep their defaults
    assert s.scheduler.worker_lease_ms == 1500.0
    assert s.nats_url == "nats://10.0.0.1:4222"
    assert s.node == "gpu-box-7"  # dots would split the subject token


def test_env_groups_and_models_as_json(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MUSERVE_GROUPS", json.dumps({"chat": {"policy": "fcfs", "max_queue": 4}, "embed": {}}))
    clean_env.setenv(
        "MUSERVE_MODELS",
        json.dumps([chat_model("tiny").model_dump(), chat_model("other", "embed").model_dump()]),
    )
    s = Settings()
    assert s.groups["chat"] == GroupSpec(policy="fcfs", max_queue=4)
    assert s.groups["embed"] == GroupSpec()
    assert [m.name for m in s.models] == ["tiny", "other"]
    assert [m.name for m in s.models_in("embed")] == ["other"]


def test_env_value_that_fails_validation_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("MUSERVE_WORKER__MAX_SEQS", "0")
    with pytest.raises(ValidationError, match="max_seqs"):
        Settings()


@pytest.mark.parametrize("name", ["a.b", "a b", "a*", "a>", "", "dé"])
def test_model_names_must_be_subject_tokens(name: str) -> None:
    with pytest.raises(ValidationError, match="NATS subject token"):
        chat_model(name)


@pytest.mark.parametrize("name", ["a.b", "x*"])
def test_group_names_must_be_subject_tokens(clean_env: pytest.MonkeyPatch, name: str) -> None:
    with pytest.raises(ValidationError, match="NATS subject token"):
        chat_model(group=name)
    with pytest.raises(ValidationError, match="NATS subject token"):
        Settings(models=[], groups={name: GroupSpec()})


def test_model_naming_an_unknown_group_is_rejected(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="names group 'gpu', not in groups"):
        Settings(models=[chat_model(group="gpu")])


def test_duplicate_model_names_are_rejected(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError, match="duplicate model names"):
        Settings(models=[chat_model("m1"), chat_model("m1")])


def test_scheduler_groups_must_exist(clean_env: pytest.MonkeyPatch) -> None:
    assert Settings(scheduler=SchedulerSettings(groups=["chat"])).scheduler.groups == ["chat"]
    with pytest.raises(ValidationError, match="unknown groups"):
        Settings(scheduler=SchedulerSettings(groups=["chat", "zzz"]))


@pytest.mark.parametrize("edges", [[], [96, 96], [265, 96], [0, 10], [-5, 10]])
def test_edges_tokens_must_be_positive_and_increasing(edges: list[int]) -> None:
    with pytest.raises(ValidationError, match="strictly increasing"):
        PredictorSettings(edges_tokens=edges)


def test_edges_tokens_accepts_increasing() -> None:
    assert PredictorSettings(edges_tokens=[1, 2, 1000]).edges_tokens == [1, 2, 1000]


# -- subjects --------------------------------------------------------------------------------------


@pytest.mark.parametrize("token", ["chat", "smollm2-135m-instruct", "A_b-9", "0"])
def test_check_token_accepts(token: str) -> None:
    assert subjects.check_token(token) == token


@pytest.mark.parametrize("token", ["", "a.b", "a b", "*", ">", "a/b", "x\ty", "é"])
def test_check_token_rejects(token: str) -> None:
    with pytest.raises(ValueError, match="model name"):
        subjects.check_token(token, "model name")


def test_check_token_rejects_a_trailing_newline() -> None:
    with pytest.raises(ValueError):
        subjects.check_token("chat\n")


def test_subject_builders() -> None:
    assert subjects.generate("m1") == "muserve.v1.generate.m1"
    assert subjects.embed("e5") == "muserve.v1.embed.e5"
    assert subjects.jobs("chat") == "muserve.v1.jobs.chat"
    assert subjects.jobs_consumer("chat") == "sched-chat"
    assert subjects.jobs_deliver("chat") == "muserve.v1.sched.chat.deliver"
    assert subjects.sched_pull("chat") == "muserve.v1.sched.chat.pull"
    assert subjects.sched_done("chat") == "muserve.v1.sched.chat.done"
    assert subjects.worker_heartbeat("chat", "w1") == "muserve.v1.workers.heartbeat.chat.w1"
    assert subjects.worker_cancel("w1") == "muserve.v1.worker.w1.cancel"
    assert subjects.worker_prediction("w1") == "muserve.v1.worker.w1.prediction"
    assert subjects.completions("m1") == "muserve.v1.completions.m1"
    assert subjects.queue_telemetry("chat") == "muserve.v1.telemetry.queue.chat"
    assert subjects.step_telemetry("n1", 2) == "muserve.v1.telemetry.steps.n1.2"
    assert subjects.step_telemetry_node("n1") == "muserve.v1.telemetry.steps.n1.*"
    assert subjects.power_telemetry("n1", 0) == "muserve.v1.telemetry.power.n1.0"
    assert subjects.status("gateway") == "muserve.v1.status.gateway"


def test_wildcards_cover_their_builders() -> None:
    """Each `.>`/`.*` subscription subject is a prefix of what the matching builder makes."""
    pairs = [
        (subjects.WORKER_HEARTBEAT_ALL, subjects.worker_heartbeat("g", "w")),
        (subjects.QUEUE_TELEMETRY_ALL, subjects.queue_telemetry("g")),
        (subjects.COMPLETIONS_ALL, subjects.completions("m")),
        (subjects.GENERATE_ALL, subjects.generate("m")),
        (subjects.EMBED_ALL, subjects.embed("m")),
        (subjects.step_telemetry_node("n"), subjects.step_telemetry("n", 0)),
    ]
    for pattern, subject in pairs:
        assert _nats_match(pattern, subject), (pattern, subject)
    assert not _nats_match(subjects.GENERATE_ALL, subjects.embed("m"))
    assert subjects.PREDICT == "muserve.v1.predict" and subjects.CANCEL == "muserve.v1.cancel"


def _nats_match(pattern: str, subject: str) -> bool:
    """NATS wildcard semantics: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def test_every_nullable_wire_field_has_a_default() -> None:
    """encode() drops None values, so a nullable field without a default would not survive a round trip."""
    import services.common.schemas as schemas

    models = [
        obj
        for obj in vars(schemas).values()
        if isinstance(obj, type) and issubclass(obj, schemas.BaseModel) and obj.__module__ == schemas.__name__
    ]
    assert len(models) > 15
    for model in models:
        for name, info in model.model_fields.items():
            if "None" in str(info.annotation):
                assert not info.is_required(), f"{model.__name__}.{name} is nullable but required"
