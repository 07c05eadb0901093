"""``tokenrelay chat``: the gateway's page API from a terminal, one-shot or interactive.

One-shot (a prompt argument, or the prompt on stdin when stdin is not a terminal) prints
one answer and exits: 0 when it completed, 1 on an error, 130 when stopped with Ctrl-C.
Interactive (no prompt, a terminal) keeps a conversation: line editing and a prompt
history file (readline), ``/model NAME``, ``/new``, ``/help``, ``/quit``.

Ctrl-C while an answer streams asks the gateway to stop it (``POST
/api/streams/{id}/cancel``: the upstream is cut off and the stored answer is
``cancelled``) and shows the end the gateway sends; a second Ctrl-C stops waiting for it.
At the prompt, a Ctrl-C right after another one, or Ctrl-D, quits. A connection dropped
mid-answer is resumed with ``Last-Event-ID`` (the gateway replays what was missed, exactly
once). Text goes to stdout as it arrives; reasoning and tool calls too, labelled (reasoning
dimmed on a colour terminal, unless ``NO_COLOR`` is set); retries, the final line and errors
go to stderr. A gateway that cannot be reached, or refuses the key, is one line on stderr
and exit status 1 — never a traceback (mid-session: the line, and the prompt stays).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import aiohttp
import orjson

from tokenrelay.sse import SSEDecoder

RESUME_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0, 8.0)  # waits before each resume attempt
CANCEL_WAIT_S = 10.0  # after Stop, how long the final event may take to come
HELP = """\
  /model NAME   ask NAME from now on (/model alone: the current one and the list)
  /new          start a new conversation
  /help         this list
  /quit         leave (or Ctrl-D)
  Ctrl-C stops an answer (on the gateway too); Ctrl-C again at the prompt quits."""


class GatewayUnusable(Exception):
    """The gateway cannot be reached or refuses us: one line for the user, exit 1."""


@dataclass
class Answer:
    """How one answer ended."""

    state: str = "error"  # complete | cancelled | error | interrupted | abandoned
    text: str = ""
    conversation_id: str | None = None


@dataclass
class Turn:
    """What Ctrl-C needs to know about the answer in flight."""

    stream_id: str | None = None
    last_id: int = 0  # the id of the last event received: where a resume starts
    stop_requested: bool = False
    abandoned: bool = False
    cancel_task: asyncio.Task[None] | None = None


class Printer:
    """Writes events to the terminal: text plain, reasoning and tool calls labelled."""

    def __init__(self, out: TextIO, err: TextIO, color: bool) -> None:
        self.out = out
        self.err = err
        self.color = color
        self.section = ""  # what the last write was: "", text, reasoning, tool
        self.tool_index: int | None = None
        self.tool_names: dict[Any, str] = {}  # per tool-call index (only the first has it)
        self.column = 0  # characters written since the last newline on stdout
        # Both on one terminal: a status line must not start in the middle of the text.
        # Otherwise stdout stays exactly the answer (for scripts).
        self.shared = out.isatty() and err.isatty()

    def _dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def _write(self, text: str) -> None:
        if not text:
            return
        self.out.write(text)
        self.out.flush()
        newline = text.rfind("\n")
        self.column = len(text) - newline - 1 if newline >= 0 else self.column + len(text)

    def _enter(self, section: str, label: str) -> None:
        if self.section != section:
            if self.column:
                self._write("\n")
            if self.section:
                self._write("\n")
            if label:
                self._write(self._dim(label) if section == "reasoning" else label)
            self.section = section

    def text(self, text: str) -> None:
        self._enter("text", "")
        self._write(text)

    def reasoning(self, text: str) -> None:
        self._enter("reasoning", "[reasoning] ")
        self._write(self._dim(text))

    def tool_call(self, payload: dict[str, Any]) -> None:
        index = payload.get("index")
        if payload.get("name"):
            self.tool_names[index] = str(payload["name"])
        if self.section != "tool" or index != self.tool_index:
            # Fragments of parallel calls may interleave: each switch gets its own line.
            if self.section == "tool":
                self.section = ""
            self._enter("tool", f"[tool call {self.tool_names.get(index, '')}] ")
            self.tool_index = index
        self._write(str(payload.get("arguments") or ""))

    def note(self, text: str) -> None:
        """A status line on stderr, on a line of its own."""
        if self.column and self.shared:
            self._write("\n")
        self.err.write(text + "\n")
        self.err.flush()

    def end(self) -> None:
        if self.column:
            self._write("\n")
        self.section = ""
        self.tool_index = None
        self.tool_names = {}


class GatewayClient:
    """The page's HTTP API (``/api/chat``, resume, cancel, models) over one aiohttp session."""

    def __init__(self, url: str, api_key: str | None, history: bool) -> None:
        self.url = url.rstrip("/")
        self.headers = {"Accept": "text/event-stream"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"
        if not history:
            self.headers["X-TokenRelay-History"] = "off"
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        # No total timeout (answers take minutes); a silent socket (no heartbeat for a
        # minute) counts as a dropped connection and is resumed.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
        self.session = aiohttp.ClientSession(timeout=timeout)

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    def _unreachable(self, exc: BaseException) -> GatewayUnusable:
        cause = getattr(exc, "os_error", None) or exc
        errno = getattr(cause, "errno", None)
        # asyncio's own strerror is "Connect call failed (...)": the errno says why.
        reason = (os.strerror(errno) if isinstance(errno, int) and errno > 0
                  else getattr(cause, "strerror", None)) or type(exc).__name__
        return GatewayUnusable(f"cannot reach the gateway at {self.url} ({reason}): is "
                               "'tokenrelay serve' running there? (--url sets the address)")

    async def _refusal(self, resp: aiohttp.ClientResponse) -> GatewayUnusable | str:
        """A non-200 answer: a GatewayUnusable for auth trouble, else the error's text."""
        try:
            error = (await resp.json(content_type=None))["error"]
            message = f"{error['message']} ({error['code']}, HTTP {resp.status})"
        except Exception:
            message = f"HTTP {resp.status}"
        if resp.status in (401, 403):
            return GatewayUnusable(f"the gateway refused the API key: {message}; pass --api-key "
                                   "or set TOKENRELAY_API_KEY")
        return message

    async def models(self) -> dict[str, Any]:
        assert self.session is not None
        try:
            async with self.session.get(self.url + "/api/models", headers=self.headers) as resp:
                if resp.status != 200:
                    problem = await self._refusal(resp)
                    if isinstance(problem, GatewayUnusable):
                        raise problem
                    raise GatewayUnusable(f"the gateway answered {problem} for /api/models")
                data: dict[str, Any] = await resp.json()
                return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from None

    async def cancel(self, stream_id: str) -> None:
        assert self.session is not None
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with self.session.post(f"{self.url}/api/streams/{stream_id}/cancel",
                                         headers=self.headers) as resp:
                await resp.read()

    async def ask(self, body: dict[str, Any], printer: Printer, turn: Turn) -> Answer:
        """Stream one answer to ``printer``; resume after a dropped connection."""
        assert self.session is not None
        answer = Answer(conversation_id=body.get("conversation_id"))
        resp: aiohttp.ClientResponse | None  # None while a resume attempt found no gateway
        try:
            resp = await self.session.post(self.url + "/api/chat", data=orjson.dumps(body),
                                           headers={**self.headers,
                                                    "Content-Type": "application/json"})
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._unreachable(exc) from None
        text: list[str] = []
        try:
            if resp.status != 200:
                problem = await self._refusal(resp)
                if isinstance(problem, GatewayUnusable):
                    raise problem
                printer.note(f"[error: {problem}]")
                return answer
            turn.stream_id = resp.headers.get("X-Stream-Id")
            answer.conversation_id = resp.headers.get("X-Conversation-Id") or \
                answer.conversation_id
            if turn.stop_requested and turn.stream_id:  # Ctrl-C came before the headers
                turn.cancel_task = asyncio.ensure_future(self.cancel(turn.stream_id))
            for delay in (0.0, *RESUME_DELAYS):
                if delay:
                    if resp is not None:
                        resp.release()
                    await asyncio.sleep(delay)
                    resp = await self._resume(turn.stream_id, turn.last_id)
                if resp is None:
                    continue
                try:
                    state = await _relay(resp, printer, text, turn)
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                        TimeoutError):
                    state = None
                if state is not None:
                    answer.state = state
                    break
                if not turn.stream_id:
                    break
                printer.note(f"[connection lost: resuming after event {turn.last_id}]")
            else:
                printer.note("[the gateway cannot be reached any more: answer lost]")
        finally:
            if resp is not None:
                resp.release()
            answer.text = "".join(text)
        return answer

    async def _resume(self, stream_id: str | None, last_id: int) -> aiohttp.ClientResponse | None:
        assert self.session is not None
        try:
            resp = await self.session.get(f"{self.url}/api/streams/{stream_id}/events",
                                          headers={**self.headers, "Last-Event-ID": str(last_id)})
        except (aiohttp.ClientError, TimeoutError):
            return None
        if resp.status != 200:
            resp.release()
            return None
        return resp


async def _relay(resp: aiohttp.ClientResponse, printer: Printer, text: list[str],
                 turn: Turn) -> str | None:
    """Print the events of one response (``turn.last_id`` follows them); the final state,
    or None when the response ended without one (a dropped connection)."""
    decoder = SSEDecoder()
    async for data in resp.content.iter_any():
        for event in decoder.decode(data):
            if event.id:
                turn.last_id = int(event.id)
            payload = orjson.loads(event.data)
            name = event.event
            if name == "message":
                text.append(payload["content"])
                printer.text(payload["content"])
            elif name == "reasoning":
                printer.reasoning(payload["reasoning"])
            elif name == "tool_call":
                printer.tool_call(payload)
            elif name == "retry":
                printer.note(f"[retrying in {payload['wait_ms'] / 1000:g} s: "
                             f"{payload.get('message') or payload['reason']}]")
            elif name == "done":
                stats = payload.get("stats") or {}
                printer.end()
                printer.note(f"[{payload['state']} · {payload.get('model')} · "
                             f"TTFT {stats.get('ttft_ms')} ms · "
                             f"{stats.get('tokens_per_s')} tok/s]")
                return str(payload["state"])
            elif name == "error":
                printer.end()
                printer.note(f"[error: {payload['error']['message']}]")
                return str(payload.get("state") or "error")
    return None


def _color(stream: TextIO) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


class ChatSession:
    """A conversation: model, messages so far, and the stored conversation's id."""

    def __init__(self, client: GatewayClient, model: str | None, printer: Printer) -> None:
        self.client = client
        self.model = model
        self.printer = printer
        self.messages: list[dict[str, str]] = []
        self.conversation_id: str | None = None
        self.stopped = False  # the last turn was stopped with Ctrl-C

    async def turn(self, prompt: str) -> Answer:
        """Ask ``prompt`` in this conversation; Ctrl-C stops the answer (see module doc)."""
        loop = asyncio.get_running_loop()
        turn = Turn()
        task = asyncio.current_task()
        assert task is not None

        give_up: list[asyncio.TimerHandle] = []

        def on_sigint() -> None:
            if turn.stop_requested:  # a second Ctrl-C: stop waiting for the gateway's end
                task.cancel()
                return
            turn.stop_requested = True
            self.printer.note("[stopping the answer ...]")
            if turn.stream_id:  # else ask() sends the cancel as soon as it knows the id
                turn.cancel_task = asyncio.ensure_future(self.client.cancel(turn.stream_id))
            give_up.append(loop.call_later(CANCEL_WAIT_S, task.cancel))

        body: dict[str, Any] = {"messages": [*self.messages,
                                             {"role": "user", "content": prompt}]}
        if self.model:
            body["model"] = self.model
        if self.conversation_id:
            body["conversation_id"] = self.conversation_id
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, on_sigint)
        try:
            answer = await self.client.ask(body, self.printer, turn)
        except asyncio.CancelledError:
            self.printer.end()
            self.printer.note("[stopped waiting; the gateway has been told to stop]")
            answer = Answer(state="abandoned")
        finally:
            with contextlib.suppress(NotImplementedError):
                loop.remove_signal_handler(signal.SIGINT)
            for handle in give_up:
                handle.cancel()
            if turn.cancel_task is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(turn.cancel_task, 5)
        self.conversation_id = answer.conversation_id or self.conversation_id
        self.messages.append({"role": "user", "content": prompt})
        if answer.text:
            self.messages.append({"role": "assistant", "content": answer.text})
        self.stopped = turn.stop_requested
        return answer

    def new(self) -> None:
        self.messages = []
        self.conversation_id = None


def _history_file() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    return Path(base) / "tokenrelay" / "chat_history"


def _setup_readline() -> Any:
    try:
        import readline
    except ImportError:  # no line editing on this platform: input() still works
        return None
    path = _history_file()
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)
    return readline


def _save_history(readline: Any) -> None:
    if readline is None:
        return
    path = _history_file()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.write_history_file(path)


def run_chat(url: str, model: str | None, prompt: str | None, api_key: str | None,
             history: bool = True) -> int:
    """The ``tokenrelay chat`` command; returns the exit status."""
    printer = Printer(sys.stdout, sys.stderr, _color(sys.stdout))
    client = GatewayClient(url, api_key, history)
    if prompt is None and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            print("tokenrelay chat: no question on stdin", file=sys.stderr)
            return 2
    with asyncio.Runner() as runner:
        runner.run(client.open())
        try:
            if prompt is not None:
                return runner.run(_one_shot(client, model, prompt, printer))
            return _interactive(runner, client, model, printer)
        except GatewayUnusable as exc:
            printer.end()
            print(f"tokenrelay chat: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:  # Ctrl-C outside an answer (say, while connecting)
            print(file=sys.stderr)
            return 130
        except BrokenPipeError:  # `tokenrelay chat ... | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
        finally:
            runner.run(client.close())


async def _one_shot(client: GatewayClient, model: str | None, prompt: str,
                    printer: Printer) -> int:
    session = ChatSession(client, model, printer)
    answer = await session.turn(prompt)
    if session.stopped:
        return 130
    return 0 if answer.state == "complete" else 1


def _interactive(runner: asyncio.Runner, client: GatewayClient, model: str | None,
                 printer: Printer) -> int:
    info = runner.run(client.models())
    known = [m["id"] for m in info.get("models", [])]
    any_model = bool(info.get("any_model"))
    session = ChatSession(client, model or info.get("default"), printer)
    problem = info.get("problem")
    if problem:
        printer.note(f"warning: {problem['message']}\n  {problem['hint']}")
    printer.note(f"tokenrelay chat · {client.url} · model {session.model or '(none)'} · "
                 "/help for commands, Ctrl-D to quit")
    readline = _setup_readline()
    interrupted = False  # the last thing the user did was Ctrl-C
    try:
        while True:
            try:
                line = input(f"{session.model or '?'}> ")
            except KeyboardInterrupt:
                if interrupted:
                    printer.note("")
                    return 0
                interrupted = True
                printer.note("\n(Ctrl-C again or Ctrl-D to quit)")
                continue
            except EOFError:
                printer.note("")
                return 0
            interrupted = False
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if _command(line, session, known, any_model, printer):
                    return 0
                continue
            if not session.model:
                printer.note("no model: choose one with /model NAME")
                continue
            try:
                runner.run(session.turn(line))
            except GatewayUnusable as exc:  # it went away mid-session: say so, stay here
                printer.note(f"tokenrelay chat: {exc}")
                continue
            interrupted = session.stopped
    finally:
        _save_history(readline)


def _command(line: str, session: ChatSession, known: list[str], any_model: bool,
             printer: Printer) -> bool:
    """Run a slash command; True means quit."""
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name in ("/quit", "/exit", "/q"):
        return True
    if name == "/help":
        printer.note(HELP)
    elif name == "/new":
        session.new()
        printer.note("[new conversation]")
    elif name == "/model":
        if not arg:
            printer.note(f"model: {session.model}; available: {', '.join(known) or '(none)'}"
                         + (" (or any name the upstream knows)" if any_model else ""))
        elif arg in known or any_model:
            session.model = arg
            printer.note(f"[model: {arg}]")
        else:
            printer.note(f"unknown model {arg!r}; available: {', '.join(known)}")
    else:
        printer.note(f"unknown command {name}; /help lists them")
    return False
