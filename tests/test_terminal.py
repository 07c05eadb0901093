"""``tokenrelay chat`` as people use it: a real process in a pseudo-terminal (pexpect)
against a real ``tokenrelay serve`` process with the built-in simulator (issue 14)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pexpect
import pytest

from support.processes import TOKENRELAY, free_port
from tokenrelay.simulator import build_text

TIMEOUT = 30  # seconds any one expectation may take on a loaded machine


def _get(url: str, headers: dict[str, str] | None = None) -> Any:
    request = urllib.request.Request(url, headers=headers or {})
    with urllib.request.urlopen(request, timeout=10) as resp:
        return json.loads(resp.read())


@contextlib.contextmanager
def serve(tmp: Path, **env: str) -> Iterator[str]:
    """``tokenrelay serve`` on a free port (simulator at its normal, slow speed)."""
    port = free_port()
    log = (tmp / f"gateway-{port}.log").open("wb")
    proc = subprocess.Popen(
        [str(TOKENRELAY), "serve", "--port", str(port)],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp),
             "TOKENRELAY_DATABASE_URL": f"sqlite:///{tmp / f'chat-{port}.db'}", **env},
        stdout=log, stderr=subprocess.STDOUT, cwd=tmp,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):  # until it answers (bounded: ~30 s)
            if proc.poll() is not None:
                raise RuntimeError((tmp / f"gateway-{port}.log").read_text())
            try:
                urllib.request.urlopen(url + "/healthz", timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serve(tmp_path_factory.mktemp("chat")) as url:
        yield url


def client_env(tmp: Path) -> dict[str, str]:
    return {"PATH": os.environ["PATH"], "HOME": str(tmp), "XDG_STATE_HOME": str(tmp / "state"),
            "TERM": "xterm", "NO_COLOR": "1"}


def spawn(tmp: Path, *args: str) -> pexpect.spawn:
    child = pexpect.spawn(str(TOKENRELAY), ["chat", *args], env=client_env(tmp),
                          encoding="utf-8", timeout=TIMEOUT, dimensions=(50, 160))
    child.logfile_read = (tmp / f"transcript-{child.pid}.txt").open("w")
    return child


def finish(child: pexpect.spawn) -> tuple[int, str]:
    """Wait for the end; (exit status, everything it printed)."""
    child.expect(pexpect.EOF)
    child.close()
    child.logfile_read.close()
    transcript = Path(child.logfile_read.name).read_text()
    return child.exitstatus, transcript


def conversations(url: str) -> list[dict[str, Any]]:
    found = _get(url + "/api/conversations")["conversations"]
    return [_get(f"{url}/api/conversations/{c['id']}") for c in found]


def test_interactive_turn_model_switch_ctrl_c_cancels_on_the_gateway_and_ctrl_d_exits(
    gateway: str, tmp_path: Path
) -> None:
    child = spawn(tmp_path, "--url", gateway, "--model", "sim-fast")
    child.expect("/help for commands")
    child.expect("sim-fast> ")
    child.sendline("first question")
    child.expect(r"\[complete · sim-fast")
    child.expect("sim-fast> ")
    child.sendline("/model sim-chat")
    child.expect(r"\[model: sim-chat\]")
    child.expect("sim-chat> ")
    child.sendline("a long second question")
    child.expect("##")  # the answer has started streaming (sim-chat: ~60 tokens/s)
    child.sendintr()
    child.expect(r"\[stopping the answer")
    child.expect(r"\[cancelled · sim-chat")
    child.expect("sim-chat> ")
    child.sendeof()
    status, transcript = finish(child)
    assert status == 0
    assert "Traceback" not in transcript

    found = [c for c in conversations(gateway) if c["title"] == "first question"]
    assert len(found) == 1, "both turns belong to one stored conversation"
    messages = found[0]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[1]["state"] == "complete"
    assert messages[1]["content"] == "".join(
        build_text("sim-fast", [{"role": "user", "content": "first question"}]))
    assert messages[3]["state"] == "cancelled"
    full = "".join(build_text("sim-chat", [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": messages[1]["content"]},
        {"role": "user", "content": "a long second question"}]))
    assert 0 < len(messages[3]["content"]) < len(full)
    assert full.startswith(messages[3]["content"])


def test_one_shot_ctrl_c_stops_the_answer_on_the_gateway_and_exits_130(
    gateway: str, tmp_path: Path
) -> None:
    child = spawn(tmp_path, "--url", gateway, "--model", "sim-chat", "one shot to stop")
    child.expect("##")
    child.sendintr()
    child.expect(r"\[cancelled · sim-chat")
    status, transcript = finish(child)
    assert status == 130
    assert "Traceback" not in transcript
    [found] = [c for c in conversations(gateway) if c["title"] == "one shot to stop"]
    assert found["messages"][-1]["state"] == "cancelled"


def test_ctrl_c_at_the_prompt_twice_quits_cleanly(gateway: str, tmp_path: Path) -> None:
    child = spawn(tmp_path, "--url", gateway)
    child.expect("sim-chat> ")
    child.sendintr()
    child.expect(r"Ctrl-C again or Ctrl-D to quit")
    child.expect("sim-chat> ")
    child.sendintr()
    status, transcript = finish(child)
    assert status == 0
    assert "Traceback" not in transcript and "KeyboardInterrupt" not in transcript


def test_help_new_and_unknown_commands_answer_in_one_line(gateway: str, tmp_path: Path) -> None:
    child = spawn(tmp_path, "--url", gateway)
    child.expect("sim-chat> ")
    child.sendline("/help")
    child.expect("/model NAME")
    child.expect("sim-chat> ")
    child.sendline("/model no-such-model")
    child.expect("unknown model 'no-such-model'; available: sim-chat")
    child.sendline("/new")
    child.expect(r"\[new conversation\]")
    child.sendline("/quit")
    status, transcript = finish(child)
    assert status == 0
    assert "Traceback" not in transcript


def test_prompt_history_is_kept_between_sessions(gateway: str, tmp_path: Path) -> None:
    child = spawn(tmp_path, "--url", gateway)
    child.expect("sim-chat> ")
    child.sendline("/model sim-fast")
    child.expect("sim-fast> ")
    child.sendeof()
    assert finish(child)[0] == 0
    saved = (tmp_path / "state" / "tokenrelay" / "chat_history").read_text()
    assert "/model sim-fast" in saved
    child = spawn(tmp_path, "--url", gateway)
    child.expect("sim-chat> ")
    child.send("\x1b[A")  # arrow up: the last line of the previous session
    child.expect("/model sim-fast")
    child.sendline("")
    child.expect(r"\[model: sim-fast\]")
    child.sendeof()
    assert finish(child)[0] == 0


def test_gateway_down_is_one_line_and_exit_1(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    for args in ((), ("one question",)):
        child = spawn(tmp_path, "--url", url, *args)
        status, transcript = finish(child)
        lines = [line for line in transcript.splitlines() if line.strip()]
        assert status == 1
        assert len(lines) == 1, transcript
        assert lines[0].startswith(f"tokenrelay chat: cannot reach the gateway at {url}")
        assert "Connection refused" in lines[0]


def test_a_bad_key_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with serve(tmp_path, TOKENRELAY_API_KEYS="alice:alice-key-123456") as url:
        for args in (("--api-key", "wrong-key-123456"), ("--api-key", "wrong", "a question")):
            child = spawn(tmp_path, "--url", url, *args)
            status, transcript = finish(child)
            lines = [line for line in transcript.splitlines() if line.strip()]
            assert status == 1
            assert len(lines) == 1, transcript
            assert "refused the API key" in lines[0]
            assert "wrong" not in lines[0]
        child = spawn(tmp_path, "--url", url, "--api-key", "alice-key-123456", "--model",
                      "sim-fast", "hello")
        status, transcript = finish(child)
        assert status == 0, transcript


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(TOKENRELAY), "chat", *args], input=stdin, capture_output=True,
                          text=True, timeout=TIMEOUT, env={"PATH": os.environ["PATH"]})


def test_one_shot_prints_the_answer_on_stdout_and_the_summary_on_stderr(gateway: str) -> None:
    done = _run(["--url", gateway, "--model", "sim-fast", "What", "is", "SSE?"])
    assert done.returncode == 0, done.stderr
    expected = "".join(build_text("sim-fast", [{"role": "user", "content": "What is SSE?"}]))
    assert done.stdout == expected + "\n"
    assert "[complete · sim-fast" in done.stderr


def test_prompt_from_stdin_when_it_is_not_a_terminal(gateway: str) -> None:
    done = _run(["--url", gateway, "--model", "sim-fast"], stdin="piped question\n")
    assert done.returncode == 0, done.stderr
    expected = "".join(build_text("sim-fast", [{"role": "user", "content": "piped question"}]))
    assert done.stdout == expected + "\n"


def test_reasoning_and_tool_calls_are_labelled_on_stdout(gateway: str) -> None:
    done = _run(["--url", gateway, "--model", "sim-tools", "weather?"])
    assert done.returncode == 0, done.stderr
    assert "[tool call get_weather] {" in done.stdout
    assert "[tool call get_time] {" in done.stdout
    reasoning = subprocess.run(
        [str(TOKENRELAY), "chat", "--url", gateway, "--model", "sim-reasoner", "think"],
        capture_output=True, text=True, timeout=TIMEOUT, env={"PATH": os.environ["PATH"]})
    assert reasoning.stdout.startswith("[reasoning] ")
    assert "\x1b[" not in reasoning.stdout  # not a terminal: no colour codes


def test_reasoning_is_dimmed_on_a_colour_terminal(gateway: str, tmp_path: Path) -> None:
    env = {**client_env(tmp_path)}
    del env["NO_COLOR"]
    child = pexpect.spawn(str(TOKENRELAY), ["chat", "--url", gateway, "--model", "sim-reasoner",
                                            "think"], env=env, encoding="utf-8", timeout=TIMEOUT)
    child.expect("\x1b\\[2m\\[reasoning\\] ")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_no_history_keeps_answers_out_of_history_and_stats(gateway: str) -> None:
    before = _get(gateway + "/api/conversations")["conversations"]
    stats = _get(gateway + "/api/stats")["models"]
    done = _run(["--url", gateway, "--model", "sim-think", "--no-history", "incognito"])
    assert done.returncode == 0, done.stderr
    assert _get(gateway + "/api/conversations")["conversations"] == before
    assert _get(gateway + "/api/stats")["models"] == stats
    assert "sim-think" not in {m["model"] for m in stats}


class CuttingRelay:
    """A TCP relay in front of the gateway that can cut every open connection."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.writers: list[asyncio.StreamWriter] = []
        self.response_bytes = 0
        self.grew = asyncio.Event()
        self.refuse = 0  # connections still to close at once (a gateway that is down)

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    count: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                if count:
                    self.response_bytes += len(data)
                    self.grew.set()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refuse:
            self.refuse -= 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        await asyncio.gather(self._pipe(reader, up_writer, False),
                             self._pipe(up_reader, writer, True))

    def cut(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        self.writers.clear()

    async def aclose(self) -> None:
        self.cut()
        self.server.close()
        await self.server.wait_closed()


async def _chat_through_a_cut(gateway: str, refuse: int) -> tuple[int | None, bytes, bytes]:
    """``tokenrelay chat`` through a relay that cuts the connection mid-answer and then
    refuses the next ``refuse`` connections: exit status, stdout, stderr."""
    relay = CuttingRelay(int(gateway.rsplit(":", 1)[1]))
    port = await relay.start()
    try:
        proc = await asyncio.create_subprocess_exec(
            str(TOKENRELAY), "chat", "--url", f"http://127.0.0.1:{port}", "--model", "sim-chat",
            "--no-history", "resume me", stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, env={"PATH": os.environ["PATH"]})
        while relay.response_bytes < 4000:  # well into the answer (~5 s of text in all)
            relay.grew.clear()
            await asyncio.wait_for(relay.grew.wait(), TIMEOUT)
        relay.refuse = refuse
        relay.cut()
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT)
    finally:
        await relay.aclose()
    assert relay.refuse == 0  # every refusal was met by a resume attempt
    return proc.returncode, out, err


async def test_a_dropped_connection_resumes_with_last_event_id_without_duplicates(
    gateway: str,
) -> None:
    returncode, out, err = await _chat_through_a_cut(gateway, refuse=0)
    assert returncode == 0, err
    expected = "".join(build_text("sim-chat", [{"role": "user", "content": "resume me"}]))
    assert out.decode() == expected + "\n"
    assert "[connection lost: resuming after event" in err.decode()
    assert "[complete · sim-chat" in err.decode()


async def test_a_resume_that_finds_the_gateway_down_is_tried_again_after_a_longer_wait(
    gateway: str,
) -> None:
    returncode, out, err = await _chat_through_a_cut(gateway, refuse=2)
    assert returncode == 0, err
    expected = "".join(build_text("sim-chat", [{"role": "user", "content": "resume me"}]))
    assert out.decode() == expected + "\n"
    assert err.decode().count("[connection lost: resuming after event") == 1
    assert "[complete · sim-chat" in err.decode()


def test_the_cli_module_runs_without_a_terminal_too() -> None:
    done = subprocess.run([sys.executable, "-m", "tokenrelay", "chat", "--help"],
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0
    assert "--no-history" in done.stdout


def test_a_gateway_that_goes_away_mid_session_is_one_line_and_the_prompt_stays(
    tmp_path: Path,
) -> None:
    with serve(tmp_path) as url:
        child = spawn(tmp_path, "--url", url)
        child.expect("sim-chat> ")
    child.sendline("are you there?")
    child.expect("tokenrelay chat: cannot reach the gateway at")
    child.expect("sim-chat> ")
    child.sendeof()
    status, transcript = finish(child)
    assert status == 0
    assert "Traceback" not in transcript


def test_the_printer_labels_reasoning_and_interleaved_tool_calls() -> None:
    import io

    from tokenrelay.terminal import Printer

    out, err = io.StringIO(), io.StringIO()
    printer = Printer(out, err, color=False)
    printer.reasoning("think ")
    printer.reasoning("more")
    printer.text("Hello")
    printer.tool_call({"index": 0, "name": "a", "arguments": '{"x"'})
    printer.tool_call({"index": 1, "name": "b", "arguments": '{"y"'})
    printer.tool_call({"index": 0, "name": None, "arguments": ":1}"})
    printer.end()
    assert out.getvalue() == ('[reasoning] think more\n\nHello\n\n[tool call a] {"x"\n'
                              '[tool call b] {"y"\n[tool call a] :1}\n')
    colored = io.StringIO()
    Printer(colored, err, color=True).reasoning("hm")
    assert colored.getvalue() == "\x1b[2m[reasoning] \x1b[0m\x1b[2mhm\x1b[0m"
