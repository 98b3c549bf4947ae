"""An OpenAI-compatible HTTP server over any labutils.serving engine (notebook 06).

    python -m labutils.serve [--port 8000] [--model embedded|<hub id>|<dir>] [--dtype auto|float32|bfloat16|float16]
                             [--max-model-len 2048] [--engine continuous|sequential]

Endpoints (the subset of OpenAI's API that vLLM's server also speaks):

- ``POST /v1/completions``: ``prompt`` a string or a list of token ids; ``max_tokens`` (default 16),
  ``temperature`` (default 1.0, 0 = greedy), ``top_p``, ``seed``, ``stream``, ``stream_options:
  {"include_usage": true}``, and vLLM's ``ignore_eos`` (generate exactly max_tokens tokens, as load
  tests do);
- ``POST /v1/chat/completions``: ``messages`` rendered by the tokenizer's chat template;
- ``GET /v1/models``; ``GET /health``.

With ``stream: true`` the reply is server-sent events, one ``data: {chunk}`` per token in OpenAI's
chunk format, then ``data: [DONE]``. Bad input gets status 400 and OpenAI's error body
``{"error": {"message", "type": "invalid_request_error", "param", "code"}}``.

Design: the standard library's ``ThreadingHTTPServer`` gives each connection a thread that parses
and tokenizes the request, hands it to the ``EngineLoop`` and waits on its own queue; the engine
loop is one background thread that owns the engine and calls ``engine.step()`` while any request is
unfinished, routing each Output to its request's queue. The engine sees one caller, so it needs no
locks, and swapping SequentialEngine for a batching scheduler changes nothing here.
"""
from __future__ import annotations

import argparse
import itertools
import json
import queue
import sys
import threading
import time
import traceback
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from .serving import Engine, Request, check_fits


# ---- the engine loop: one thread owns the engine ----------------------------------------------------
class EngineLoop:
    """Runs ``engine.step()`` in a background thread while requests are unfinished.

    ``submit(request)`` returns a queue that receives the request's Outputs (the last one finished),
    or an Exception if the engine failed on it. ``abort(id)`` drops a request (client gone).
    """

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", request, q) | ("abort", id)
        self._queues: dict[str, queue.SimpleQueue] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._idle_wait_s = idle_wait_s
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self.thread.start()

    def submit(self, request: Request) -> queue.SimpleQueue:
        check_fits(request, self.engine.max_seq_len)  # a too-long request fails in the caller's thread
        q: queue.SimpleQueue = queue.SimpleQueue()
        self._inbox.put(("add", request, q))
        self._wake.set()
        return q

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id, None))
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self.thread.join(timeout=10)

    def _drain_inbox(self):
        while True:
            try:
                kind, item, q = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.engine.add(item)
                except Exception as e:  # noqa: BLE001  (a request the engine refuses: tell its caller)
                    q.put(e)
                    continue
                self._queues[item.id] = q
            elif self._queues.pop(item, None) is not None:
                self.engine.abort(item)

    def _run(self):
        while not self._stop.is_set():
            self._drain_inbox()
            if not self.engine.has_unfinished():
                self._wake.wait(self._idle_wait_s)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # noqa: BLE001  (fail the requests in flight, keep serving)
                traceback.print_exc()
                for rid, q in list(self._queues.items()):
                    q.put(RuntimeError(f"the engine failed: {type(e).__name__}: {e}"))
                    self.engine.abort(rid)
                self._queues.clear()
                continue
            self.steps += 1
            for o in outputs:
                q = self._queues.get(o.request_id)
                if q is None:  # aborted meanwhile
                    continue
                q.put(o)
                if o.finished:
                    del self._queues[o.request_id]


# ---- text from tokens, a piece at a time -------------------------------------------------------------
class Detokenizer:
    """Incremental detokenization (as vLLM's): the text of the new tokens is the decode of a short
    window minus the decode of its prefix, held back while it ends in an incomplete UTF-8 character
    (U+FFFD). The pieces concatenate to ``tokenizer.decode(all ids)`` for byte-level BPE."""

    def __init__(self, tokenizer, skip_ids=frozenset()):
        self.tokenizer, self.ids, self.skip = tokenizer, [], skip_ids
        self.prefix_offset = self.read_offset = 0

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def add(self, ids: list[int]) -> str:
        self.ids.extend(t for t in ids if t not in self.skip)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return full[len(prefix):]
        return ""

    def flush(self) -> str:
        """What is still held back at the end (a stray partial character, as U+FFFD)."""
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix):]


# ---- request parsing ---------------------------------------------------------------------------------
class BadRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400):
        super().__init__(message)
        self.param, self.status = param, status


_UNSUPPORTED = {"n": 1, "best_of": 1, "echo": False, "logprobs": None, "top_logprobs": None, "stop": None,
                "suffix": None, "tools": None, "tool_choice": None, "functions": None, "logit_bias": None,
                "response_format": None}


def _number(body, name, default, lo, hi, integer=False, lo_open=False):
    v = body.get(name, default)
    if v is None:
        v = default
    ok_type = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok_type:
        raise BadRequest(f"{name} must be {'an integer' if integer else 'a number'}, got {v!r}", name)
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise BadRequest(f"{name} must be {rng}, got {v}", name)
    return v


class OpenAIFrontEnd:
    """Turns OpenAI request bodies into Requests and Outputs into OpenAI responses (no HTTP here)."""

    def __init__(self, loop: EngineLoop, tokenizer, model_name: str, aliases=(), stop_ids=frozenset()):
        self.loop, self.tokenizer, self.model_name = loop, tokenizer, model_name
        self.names = {model_name, *aliases}
        self.stop_ids = frozenset(stop_ids)
        self.created = int(time.time())
        self._tok_lock = threading.Lock()  # a fast tokenizer must not be entered by two threads at once
        self._ids = itertools.count()

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                            "owned_by": "labutils", "max_model_len": self.loop.engine.max_seq_len}]}

    def _prompt_ids(self, body: dict, chat: bool) -> list[int]:
        vocab = len(self.tokenizer)
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise BadRequest("messages must be a non-empty list of {role, content} objects", "messages")
            clean = []
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                    raise BadRequest(f"messages[{i}] must be an object with a string role", "messages")
                content = m.get("content")
                if isinstance(content, list):  # OpenAI's content parts: keep the text ones
                    if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                               for p in content):
                        raise BadRequest(f"messages[{i}].content: only text parts are supported", "messages")
                    content = "".join(p["text"] for p in content)
                if not isinstance(content, str):
                    raise BadRequest(f"messages[{i}].content must be a string", "messages")
                clean.append({"role": m["role"], "content": content})
            if not getattr(self.tokenizer, "chat_template", None):
                raise BadRequest(f"the model {self.model_name} has no chat template: use /v1/completions")
            with self._tok_lock:
                ids = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                         return_dict=True)["input_ids"]
            return list(ids)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise BadRequest("prompt is empty", "prompt")
            with self._tok_lock:
                return list(self.tokenizer(prompt).input_ids)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise BadRequest(f"prompt token ids must lie in 0..{vocab - 1}", "prompt")
            return prompt
        if isinstance(prompt, list) and len(prompt) > 1:
            raise BadRequest("one prompt per request: a batch of prompts is not supported", "prompt")
        raise BadRequest("prompt must be a non-empty string or a non-empty list of token ids", "prompt")

    def parse(self, body, chat: bool) -> tuple[Request, dict]:
        """(Request, options) from a request body, or BadRequest."""
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model", self.model_name)
        if model not in self.names:
            raise BadRequest(f"the model {model!r} does not exist here; this server serves {self.model_name!r}",
                             "model")
        for name, default in _UNSUPPORTED.items():
            v = body.get(name)
            if not (v is None or v is False or v == [] or v == default):
                raise BadRequest(f"{name}={body[name]!r} is not supported by this server", name)
        max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _number(body, max_key, 16, 1, None, integer=True)
        temperature = _number(body, "temperature", 1.0, 0, 2)
        top_p = _number(body, "top_p", 1.0, 0, 1, lo_open=True)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise BadRequest(f"seed must be an integer, got {seed!r}", "seed")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest(f"stream must be true or false, got {stream!r}", "stream")
        so = body.get("stream_options") or {}
        if not isinstance(so, dict):
            raise BadRequest("stream_options must be an object", "stream_options")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise BadRequest(f"ignore_eos must be true or false, got {ignore_eos!r}", "ignore_eos")
        prompt = self._prompt_ids(body, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        req = Request(rid, prompt, max_tokens, temperature=float(temperature), top_p=float(top_p),
                      stop_ids=frozenset() if ignore_eos else self.stop_ids, seed=seed)
        try:
            check_fits(req, self.loop.engine.max_seq_len)
        except ValueError as e:
            raise BadRequest(str(e), "messages" if chat else "prompt") from None
        return req, {"stream": stream, "include_usage": bool(so.get("include_usage")), "chat": chat,
                     "model": model}

    # -- responses --
    def _usage(self, req: Request, n_out: int) -> dict:
        return {"prompt_tokens": len(req.prompt), "completion_tokens": n_out,
                "total_tokens": len(req.prompt) + n_out}

    def _choice(self, text, finish_reason, chat, delta=False):
        if chat:
            key = "delta" if delta else "message"
            msg = {"content": text} if delta else {"role": "assistant", "content": text}
            return {"index": 0, key: msg, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def outputs(self, req: Request, q: queue.SimpleQueue, timeout_s: float | None, first=None):
        """Yield the request's Outputs from its queue (after ``first``, already taken from it); raise
        what the engine sent instead."""
        while True:
            item, first = (first, None) if first is not None else (q.get(timeout=timeout_s), None)
            if isinstance(item, Exception):
                raise item
            yield item
            if item.finished:
                return

    def complete(self, req, opts, q, first=None, timeout_s=None) -> dict:
        ids, reason = [], None
        for o in self.outputs(req, q, timeout_s, first):
            ids.extend(o.token_ids)
            reason = o.finish_reason
        text_ids = [t for t in ids if t not in req.stop_ids]
        with self._tok_lock:
            text = self.tokenizer.decode(text_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        chat = opts["chat"]
        return {"id": req.id, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": opts["model"], "choices": [self._choice(text, reason, chat)],
                "usage": self._usage(req, len(ids))}

    def stream(self, req, opts, q, first=None, timeout_s=None):
        """The chunks (dicts) of a streamed reply, one per token, the last with finish_reason."""
        chat = opts["chat"]
        base = {"id": req.id, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": opts["model"]}
        if chat:  # OpenAI opens a chat stream with the role
            yield {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None}]}
        detok = Detokenizer(self.tokenizer, req.stop_ids)
        n = 0
        for o in self.outputs(req, q, timeout_s, first):
            n += len(o.token_ids)
            with self._tok_lock:
                text = detok.add(o.token_ids)
                if o.finished:
                    text += detok.flush()
            yield {**base, "choices": [self._choice(text, o.finish_reason if o.finished else None, chat, delta=True)]}
        if opts["include_usage"]:
            yield {**base, "choices": [], "usage": self._usage(req, n)}


# ---- HTTP ----------------------------------------------------------------------------------------------
class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; streamed replies use chunked transfer encoding
    server_version = "labutils-serve"
    front: OpenAIFrontEnd  # set on the subclass made by make_server

    def log_message(self, fmt, *args):  # quiet by default; --log prints each request
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def _send_json(self, status: int, obj: dict):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str, param=None):
        kind = "invalid_request_error" if status < 500 else "server_error"
        self._send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": status}})

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._send_json(200, self.front.models())
        elif self.path == "/health":
            self._send_json(200, {"status": "ok"})
        else:
            self._error(404, f"no route GET {self.path}")

    def _body(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BadRequest(f"the request body is not valid JSON: {e}") from None

    def do_POST(self):
        path = self.path.rstrip("/")
        if path not in ("/v1/completions", "/v1/chat/completions"):
            self._error(404, f"no route POST {self.path}")
            return
        front = self.front
        try:
            req, opts = front.parse(self._body(), chat=path == "/v1/chat/completions")
            q = front.loop.submit(req)
        except BadRequest as e:
            self._error(e.status, str(e), e.param)
            return
        except ValueError as e:
            self._error(400, str(e))
            return
        first = q.get()  # the first token, or the engine's refusal: a refusal is still a 400, before any header
        if isinstance(first, Exception):
            self._error(400 if isinstance(first, ValueError) else 500, str(first))
            return
        try:
            if not opts["stream"]:
                self._send_json(200, front.complete(req, opts, q, first))
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for chunk in front.stream(req, opts, q, first):
                self._chunk(f"data: {json.dumps(chunk)}\n\n".encode())
            self._chunk(b"data: [DONE]\n\n")
            self._chunk(b"")
        except (BrokenPipeError, ConnectionResetError):  # the client went away: free the engine's slot
            front.loop.abort(req.id)
            self.close_connection = True
        except Exception as e:  # noqa: BLE001
            front.loop.abort(req.id)
            traceback.print_exc()
            if opts["stream"]:  # headers are out: end the stream with an error event, as vLLM does
                try:
                    err = {"error": {"message": str(e), "type": "server_error", "param": None, "code": 500}}
                    self._chunk(f"data: {json.dumps(err)}\n\n".encode())
                    self._chunk(b"")
                except OSError:
                    pass
                self.close_connection = True
            else:
                self._error(500, f"{type(e).__name__}: {e}")

    def _chunk(self, data: bytes):
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a connection thread never keeps the process alive
    request_queue_size = 1024  # a trace may open hundreds of connections at t = 0 (the default backlog is 5)
    verbose = False


class Server:
    """A running server: ``url``, ``front``, ``loop``; ``close()`` stops it. Built by ``make_server``."""

    def __init__(self, httpd, loop, front, thread):
        self.httpd, self.loop, self.front, self.thread = httpd, loop, front, thread
        host, port = httpd.server_address[:2]
        self.url = f"http://{host}:{port}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.loop.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_server(engine: Engine, tokenizer, model_name: str, host: str = "127.0.0.1", port: int = 0,
                aliases=(), stop_ids=None, verbose: bool = False) -> Server:
    """Serve ``engine`` over HTTP from a background thread (``port=0``: a free port). ``stop_ids``:
    the ids that end a request (default: the tokenizer's EOS)."""
    if stop_ids is None:
        stop_ids = {tokenizer.eos_token_id} - {None}
    loop = EngineLoop(engine)
    front = OpenAIFrontEnd(loop, tokenizer, model_name, aliases, stop_ids)
    handler = type("Handler", (_Handler,), {"front": front})
    httpd = _HTTPServer((host, port), handler)
    httpd.verbose = verbose
    thread = threading.Thread(target=httpd.serve_forever, name="http", daemon=True)
    thread.start()
    return Server(httpd, loop, front, thread)


def load_engine(name: str = "embedded", dtype: str = "auto", device=None, max_model_len: int | None = None,
                engine: str = "continuous"):
    """(engine, tokenizer, served name, aliases, stop ids) for a model name load_model knows. ``engine``:
    "continuous" (labutils.scheduler.ContinuousEngine, a pool of 8 full contexts) or "sequential"."""
    import torch

    from . import models, runtime
    from .decoder import Decoder
    from .serving import SequentialEngine

    dt = runtime.default_dtype() if dtype == "auto" else getattr(torch, dtype)
    hf, tokenizer = models.load_model(name, dtype=dt, device=device)
    model = Decoder.from_hf(hf)
    if engine == "continuous":
        from .scheduler import ContinuousEngine

        ctx = max_model_len or min(model.cfg.max_seq_len, 2048)
        engine = ContinuousEngine(model, num_blocks=8 * -(-ctx // 16), block_size=16, max_seq_len=ctx)
    elif engine == "sequential":
        engine = SequentialEngine(model, max_model_len)
    else:
        raise ValueError(f"engine must be 'sequential' or 'continuous', got {engine!r}")
    embedded = name in models._EMBEDDED_ALIASES
    served = models.EMBEDDED if embedded else name
    aliases = (models._EMBEDDED_ALIASES - {None, ""}) if embedded else ()
    eos = getattr(hf.generation_config, "eos_token_id", None)
    stop = set(eos if isinstance(eos, (list, tuple)) else [eos]) | {tokenizer.eos_token_id}
    return engine, tokenizer, served, aliases, stop - {None}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m labutils.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--model", default="embedded", help="embedded (SmolLM2-135M-Instruct), a hub id or a directory")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None, help="context per request (default min(model's, 2048))")
    p.add_argument("--engine", default="continuous", choices=["continuous", "sequential"],
                   help="continuous batching over a paged KV cache (labutils.scheduler) or one request at a time")
    p.add_argument("--log", action="store_true", help="print a line per HTTP request")
    a = p.parse_args(argv)
    engine, tokenizer, served, aliases, stop = load_engine(a.model, a.dtype, max_model_len=a.max_model_len,
                                                           engine=a.engine)
    srv = make_server(engine, tokenizer, served, a.host, a.port, aliases, stop, verbose=a.log)
    print(f"serving {served} ({type(engine).__name__}, context {engine.max_seq_len}) at {srv.url}/v1", flush=True)
    try:
        srv.thread.join()
    except KeyboardInterrupt:
        srv.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
