"""``jaxformer serve`` through the official openai client and raw HTTP: concurrent greedy
requests (continuous batching) give what each gives alone and what ``Generator`` gives,
streaming adds up to the whole text, stop strings cut and free the row, chat renders the
run's template, and bad requests are 400s with OpenAI's error body while the server goes on.

One tiny run dir (a jaxformer tokenizer, random weights drawn with numpy, a chat template) and
one server per module."""

from __future__ import annotations

import concurrent.futures
import json
import re
import shutil
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from jaxformer import cli  # noqa: E402
from jaxformer import config as config_lib  # noqa: E402
from jaxformer.data.tokenizer import save_tokenizer, train_tokenizer  # noqa: E402
from jaxformer.errors import UserError  # noqa: E402
from jaxformer.inference.engine import Engine  # noqa: E402
from jaxformer.inference.engine_worker import Choice  # noqa: E402
from jaxformer.inference.server import create_app, load_service, serve  # noqa: E402
from jaxformer.models.build import abstract_model  # noqa: E402
from jaxformer.runs import rundir  # noqa: E402
from jaxformer.runs.checkpoint import Checkpointer  # noqa: E402
from tests.command_line import assert_user_error, jaxformer  # noqa: E402
from tests.corpus import NAMES, document  # noqa: E402

MAX_LEN = 64
# bos_token is the jaxformer tokenizer's <|endoftext|> (id 0): a special token in the text.
CHAT = ("{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
PROMPTS = [f"def {NAMES[i % 10]}_{i}({NAMES[(i * 3 + 1) % 10]}" for i in range(16)]
MAX_TOKENS = [3 + (5 * i) % 13 for i in range(16)]  # 3 .. 15, finishing at different steps


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run dir as training leaves one (config, tokenizer, a weights checkpoint), plus a chat
    template as a converted model has. Weights N(0, 0.5^2): far from ties, so greedy paths
    do not flip on rounding."""
    run = tmp_path_factory.mktemp("serve") / "tiny-run"
    run.mkdir()
    tok = train_tokenizer([document(np.random.default_rng(0), i) for i in range(30)], 300)
    cfg = config_lib.apply_overrides(config_lib.Config(), [
        f"data.source={run}/corpus", f"data.seq_len={MAX_LEN}", f"model.max_len={MAX_LEN}",
        "model.n_layers=2", "model.d_model=32", "model.n_heads=2",
        f"model.vocab_size={tok.get_vocab_size()}"])
    rundir.write_config(run, cfg)
    save_tokenizer(tok, run / rundir.TOKENIZER_FILE)
    (run / "chat_template.jinja").write_text(CHAT)
    _, abstract = abstract_model(cfg.model)
    rng = np.random.default_rng(0)

    def init(path, sds):
        if len(sds.shape) >= 2:
            return jnp.asarray(0.5 * rng.standard_normal(sds.shape), sds.dtype)
        return jnp.full(sds.shape, 1.0 if path[-1].key == "scale" else 0.0, sds.dtype)

    params = jax.tree_util.tree_map_with_path(init, nnx.to_pure_dict(abstract))
    ckpt = Checkpointer(run / rundir.CHECKPOINT_DIR, keep=1)
    ckpt.save_params(0, params, {"config": config_lib.to_dict(cfg)})
    ckpt.close()
    return run


@pytest.fixture(scope="module")
def server(run_dir):
    """(service, port): uvicorn in a daemon thread, 4 rows (16 requests must queue)."""
    service = load_service(run_dir, max_batch=4, block_size=16)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    yield service, port
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server[1]}/v1", api_key="x",
                         timeout=60, max_retries=0)


def _post(port: int, path: str, body: bytes | dict) -> tuple[int, dict]:
    """Raw POST -> (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _complete(client, prompt, max_tokens, **kw):
    out = client.completions.create(model="anything", prompt=prompt, max_tokens=max_tokens,
                                    temperature=0, **kw)
    return out.choices[0].text, out.choices[0].finish_reason, out


def _wait_idle(service) -> None:
    """The engine thread works through cancellations between steps: wait (bounded)."""
    for _ in range(500):
        if service.engine.idle and not service.worker._live:
            return
        time.sleep(0.01)


def test_concurrent_requests_equal_each_alone_and_the_generator(server, client):
    service, _ = server
    alone = [_complete(client, p, n)[:2] for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)]
    assert len({text for text, _ in alone}) == len(PROMPTS)  # the prompts lead apart
    # Tied to the decoding core: the contiguous-cache generator, the run's end tokens.
    run = service.run
    [gen] = run.generator().generate([run.encode(PROMPTS[5])], MAX_TOKENS[5],
                                     stop_tokens=run.specials.eos_ids)
    assert (gen.text, gen.finish_reason) == alone[5]

    service.worker.peak_batch = 0
    with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(_complete, [client] * len(PROMPTS), PROMPTS, MAX_TOKENS))
    assert [t[:2] for t in together] == alone
    assert service.worker.peak_batch > 1  # they did share steps (4 rows at most)
    for (_, finish, out), n in zip(together, MAX_TOKENS, strict=True):
        assert out.object == "text_completion" and out.model == "tiny-run"
        assert out.usage.completion_tokens == n or finish == "stop"
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    _wait_idle(service)
    assert service.engine.allocator.available == service.engine.allocator.num_blocks - 1

    # A list of prompts: one choice each, in order.
    out = client.completions.create(model="m", prompt=PROMPTS[:3], max_tokens=MAX_TOKENS[2],
                                    temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.choices[2].text == alone[2][0]


def test_streaming_adds_up_to_the_whole_text(server, client):
    service, port = server
    text, finish, _ = _complete(client, PROMPTS[1], 15)
    chunks = list(client.completions.create(model="m", prompt=PROMPTS[1], max_tokens=15,
                                            temperature=0, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == text
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + [finish]
    assert len(chunks) > 2  # it did come in pieces

    # On the wire: `data: {json}` events, then `data: [DONE]`.
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/completions",
        data=json.dumps({"prompt": PROMPTS[1], "max_tokens": 15, "temperature": 0,
                         "stream": True, "stream_options": {"include_usage": True}}).encode(),
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = raw.split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events)
    data = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert "".join(d["choices"][0]["text"] for d in data[:-1]) == text
    assert data[-1]["choices"] == [] and data[-1]["usage"]["completion_tokens"] > 0

    # Chat streaming: a role first, content deltas, then an empty delta with the reason.
    messages = [{"role": "user", "content": PROMPTS[1]}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=10,
                                           temperature=0)
    parts = list(client.chat.completions.create(model="m", messages=messages, max_tokens=10,
                                                temperature=0, stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == \
        whole.choices[0].message.content
    assert parts[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert parts[-1].object == "chat.completion.chunk"


def test_stop_strings_cut_the_text_and_end_the_request(server, client):
    service, _ = server
    full, _, _ = _complete(client, PROMPTS[3], 40)
    # A stop string from the middle of the text: two ASCII letters or digits, first
    # occurring there.
    spots = [m.start() for m in re.finditer(r"(?=[A-Za-z0-9]{2})", full)]
    at = next(p for p in spots if p >= 3 and full.find(full[p:p + 2]) == p)
    stop = full[at:at + 2]
    text, finish, out = _complete(client, PROMPTS[3], 40, stop=[stop, "\x00never"])
    assert (text, finish) == (full[:at], "stop")
    assert out.usage.completion_tokens < 40
    chunks = list(client.completions.create(model="m", prompt=PROMPTS[3], max_tokens=40,
                                            temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:at]
    assert chunks[-1].choices[0].finish_reason == "stop"
    _wait_idle(service)
    assert service.engine.idle
    assert service.engine.allocator.available == service.engine.allocator.num_blocks - 1


def test_chat_renders_the_template_then_completes(server, client, monkeypatch):
    service, port = server
    messages = [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "def alpha"}]}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=12,
                                          temperature=0)
    rendered = "<|endoftext|>system: be brief\nuser: def alpha\nassistant:"
    text, finish, comp = _complete(client, rendered, 12)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert (chat.choices[0].message.content, chat.choices[0].finish_reason) == (text, finish)
    assert chat.usage.prompt_tokens == comp.usage.prompt_tokens
    assert service.run.encode(rendered)[0] == 0  # the template's BOS is the special token

    monkeypatch.setattr(service, "chat_template", None)
    status, body = _post(port, "/v1/chat/completions", {"messages": messages})
    assert status == 400 and "no chat template" in body["error"]["message"]


def test_bad_requests_are_400s_and_the_server_goes_on(server, client):
    service, port = server

    def error(body, path="/v1/completions"):
        status, out = _post(port, path, body)
        assert status == 400 and set(out) == {"error"}, out
        e = out["error"]
        assert e["type"] == "invalid_request_error" and e["code"] is None and e["message"]
        return e

    assert error(b'{"prompt": "x", ')["param"] is None
    assert error(b'["a list"]')["param"] is None
    assert error({"prompt": "x", "temperature": -1})["param"] == "temperature"
    assert error({"prompt": "x", "top_p": 1.5})["param"] == "top_p"
    assert error({"prompt": "x", "n": 2})["param"] == "n"
    assert error({"prompt": "x", "max_tokens": "8"})["param"] == "max_tokens"
    assert error({"prompt": "x", "frobnicate": 1})["param"] == "frobnicate"
    assert error({"prompt": "x", "logprobs": 2})["param"] == "logprobs"
    assert error({"max_tokens": 3})["param"] == "prompt"
    assert error({"prompt": [1, "a"]})["param"] == "prompt"
    assert "context" in error({"prompt": [5] * 60})["message"]  # 60 + 16 > 64
    assert "vocabulary" in error({"prompt": [10**6]})["message"]
    assert error({"messages": []}, "/v1/chat/completions")["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="m", prompt="x", max_tokens=4, temperature=3,
                                  extra_body={"top_k": -5})  # vLLM's extra field
    assert caught.value.status_code == 400
    status, _ = _post(port, "/v1/nothing", {})
    assert status == 404

    text, finish, out = _complete(client, PROMPTS[0], MAX_TOKENS[0])
    assert text == _complete(client, PROMPTS[0], MAX_TOKENS[0])[0] and finish
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-run"]
    _wait_idle(service)
    assert service.engine.allocator.available == service.engine.allocator.num_blocks - 1


def test_sampled_requests_follow_their_seed(client):
    def draw(seed):
        return client.completions.create(model="m", prompt=PROMPTS[2], max_tokens=8,
                                         temperature=1.0, seed=seed,
                                         extra_body={"top_k": 20}).choices[0].text

    first = draw(7)
    assert draw(7) == first
    assert any(draw(s) != first for s in (8, 9, 10))


def test_engine_cancel_frees_a_running_request_and_drops_a_waiting_one(server):
    service = server[0]
    run = service.run
    engine = Engine(run.family, run.params, max_batch=4, block_size=16)
    engine._decode = service.engine._decode  # the same shapes: reuse its compiled calls
    reqs = [engine.submit([5 + i, 6, 7], 10) for i in range(5)]
    engine.step()
    engine.step()
    a, b = reqs[0], reqs[4]
    assert len(a.tokens) == 2 and b.row is None and list(engine.waiting) == [b]
    engine.cancel(b)
    assert b.finish_reason == "stop" and not engine.waiting and b.tokens == []
    engine.cancel(a)
    assert a.finish_reason == "stop" and len(a.tokens) == 2 and a.row is None
    assert engine.rows.count(None) == 1
    for r in reqs[1:4]:
        engine.cancel(r)
    assert engine.idle
    assert engine.allocator.available == engine.allocator.num_blocks - 1
    engine.cancel(a)  # finished: left as it is
    assert a.finish_reason == "stop" and len(a.tokens) == 2


def test_choice_holds_back_partial_characters_and_stop_prefixes():
    # One character per token; "~" decodes as U+FFFD, as an unfinished UTF-8 character does.
    choice = Choice(0, [1], lambda ids: "".join(map(chr, ids)).replace("~", "\ufffd"),
                    ["cd", "xyz"])
    fed = [choice.feed([ord(c)], None) for c in "abce~xy"]
    assert fed == ["a", "b", "", "ce", "", "\ufffd", ""]  # "c", "~", "x", "xy" waited
    assert choice.finish is None
    assert choice.feed([ord("z")], None) == "" and choice.finish == "stop"
    assert choice.text == "abce\ufffd" == "".join(fed)
    done = Choice(0, [1], lambda ids: "".join(map(chr, ids)), ["zz"])
    assert done.feed([ord("q"), ord("z")], "length") == "qz"  # finished: nothing held
    assert (done.text, done.finish) == ("qz", "length")


def _prefix_lm(run_dir, tmp_path):
    """The run's config as a prefix-LM (no weights: refused before they would load)."""
    bad = tmp_path / "prefix-lm"
    bad.mkdir()
    cfg = config_lib.apply_overrides(rundir.read_config(run_dir), ["objective.kind=prefix_lm"])
    rundir.write_config(bad, cfg)
    return bad


def test_serve_refuses_a_model_it_cannot_batch(run_dir, tmp_path):
    bad = _prefix_lm(run_dir, tmp_path)
    with pytest.raises(UserError, match="prefix-LM.*causal decoder-only"):
        serve(bad, port=_free_port())
    shutil.rmtree(bad)
    with pytest.raises(UserError, match="not a directory"):
        load_service(bad)


@pytest.mark.skipif("serve" not in cli.COMMANDS, reason="`jaxformer serve` not in cli.py yet")
def test_the_command_refuses_in_one_line(run_dir, tmp_path):
    out = jaxformer("serve", str(_prefix_lm(run_dir, tmp_path)), "--port", str(_free_port()))
    assert_user_error(out, "prefix-LM", "causal decoder-only")
    assert_user_error(jaxformer("serve", str(run_dir), "--max-batch", "0"), "--max-batch")
