"""Invoke mode (grand-challenge's HTTP API): health once loaded, one invocation per case, outputs never mixed."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import SimpleITK as sitk
from fastapi.testclient import TestClient

from valdocmb.core import run
from valdocmb.core.serve import create_app, warm_up

from conftest import DarkSpotSegmenter, brain_like, make_image

ROOT = Path(__file__).resolve().parents[1]


def scan(seed=0):
    return make_image(brain_like((17, 40, 36), seed=seed, dark_spots=((8, 20, 18),)), (0.5, 0.5, 0.8))


def client_for(inp, out, *extra, runner=run.run):
    args = run.parse_arguments(["--input", str(inp), "--output", str(out), "--serve", *extra])
    return TestClient(create_app(args, DarkSpotSegmenter(), runner, {"method": args.method}))


def put_case(folder, name, seed=0):
    for old in folder.iterdir():
        old.unlink()
    sitk.WriteImage(scan(seed), str(folder / name))


def test_health_answers_once_the_app_exists(tmp_path):
    with client_for(tmp_path, tmp_path / "out") as client:
        response = client.get("/health")
    assert response.status_code == 200 and response.json()["status"] == "ready"


def test_two_invocations_in_a_row_never_mix_their_outputs(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    out.mkdir()
    (out / "platform-note.txt").write_text("not ours")  # a file no invocation wrote stays
    with client_for(inp, out) as client:
        put_case(inp, "first.nii.gz")
        first = client.post("/invoke")
        assert first.status_code == 201, first.text
        assert (out / "first_CMB.nii.gz").is_file() and "first_CMB.nii.gz" in first.json()["outputs"]

        put_case(inp, "second.mha", seed=1)
        second = client.post("/invoke")
        assert second.status_code == 201, second.text
        assert second.json()["invocation"] == 2
    assert (out / "second_CMB.mha").is_file()
    assert not (out / "first_CMB.nii.gz").exists() and not (out / "qc" / "first.png").exists()
    assert (out / "platform-note.txt").read_text() == "not ours"
    summary = (out / "summary.csv").read_text()
    assert "second" in summary and "first" not in summary


def test_a_failed_case_answers_500_with_the_error_and_leaves_no_stale_mask(tmp_path, capfd):
    from valdocmb.core.logs import setup_logging

    setup_logging(progress_to_stdout=True)   # as process.py --serve logs
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    with client_for(inp, out) as client:
        put_case(inp, "good.nii.gz")
        assert client.post("/invoke").status_code == 201
        put_case(inp, "broken.nii.gz")
        (inp / "broken.nii.gz").write_bytes(b"not a scan")
        response = client.post("/invoke")
    assert response.status_code == 500
    body = response.json()
    assert body["status"] == "failed" and body["exit_code"] == 1
    assert any("broken.nii.gz" in error for error in body["errors"])
    assert len(body["errors"]) == 1          # the run's closing summary is not a second error
    assert not list(out.glob("*_CMB.nii.gz"))
    # the platform shows the last stderr line of a failed invocation: the file and the reason
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert "broken.nii.gz" in last and "cannot be read" in last


def test_an_input_folder_without_a_case_answers_500(tmp_path):
    (tmp_path / "input").mkdir()
    with client_for(tmp_path / "input", tmp_path / "output") as client:
        response = client.post("/invoke")
    assert response.status_code == 500 and "no image file" in response.json()["errors"][0]


def test_a_crash_inside_the_runner_answers_500_not_a_dropped_connection(tmp_path):
    def explode(*_args, **_kwargs):
        raise RuntimeError("boom")

    with client_for(tmp_path, tmp_path / "out", runner=explode) as client:
        response = client.post("/invoke")
    assert response.status_code == 500 and "RuntimeError: boom" in response.json()["errors"][-1]


def test_a_warm_up_failure_is_logged_not_fatal(caplog):
    class Failing:
        def segment(self, image, timings):
            raise ValueError("no brain")

    assert warm_up(Failing()) >= 0
    assert "warm-up on a synthetic scan failed (ValueError: no brain)" in caplog.text


def test_the_invoke_image_serves_by_default_and_settings_are_checked(monkeypatch, capsys):
    monkeypatch.setenv("CMB_API_METHOD", "invoke")
    monkeypatch.setenv("CMB_PORT", "5000")
    args = run.parse_arguments([])
    assert args.serve and args.port == 5000
    assert not run.parse_arguments(["--no-serve"]).serve
    with pytest.raises(SystemExit):
        run.parse_arguments(["--shard", "1/2"])
    monkeypatch.setenv("CMB_API_METHOD", "serve")
    with pytest.raises(SystemExit) as stop:
        run.parse_arguments([])
    assert stop.value.code == 2 and "CMB_API_METHOD='serve'" in capsys.readouterr().err


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url, method="GET", timeout=120):
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_process_py_serve_with_the_shipped_weights(tmp_path):
    """The real entry point in its own process: health only once loaded, then two invocations, then SIGTERM."""
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    port = free_port()
    env = {**os.environ, "CMB_PRECISION": "float32"}
    server = subprocess.Popen([sys.executable, str(ROOT / "process.py"), "--serve", "--port", str(port),
                               "--input", str(inp), "--output", str(out), "--device", "cpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                status, body = request(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.time() < deadline, "the server never became healthy"
                time.sleep(0.5)
        assert status == 200 and body["method"] == "three-stage"
        for name in ("a.nii.gz", "b.nii.gz"):
            put_case(inp, name)
            status, body = request(f"http://127.0.0.1:{port}/invoke", method="POST")
            assert status == 201, body
        assert sorted(p.name for p in out.glob("*_CMB.nii.gz")) == ["b_CMB.nii.gz"]
    finally:
        server.terminate()
        progress, errors = server.communicate(timeout=60)
    log = progress + errors
    # uvicorn shuts down gracefully, then re-raises the signal: the exit status says SIGTERM, as in exec mode
    assert server.returncode == -15, log
    assert "ready in" in progress and "INFO" not in errors   # progress on stdout, as grand-challenge reads logs
    assert "ready in" in log and "invocation 2: exit code 0" in log and "Finished server process" in log


def test_a_second_invoke_while_one_runs_gets_409_and_health_still_answers(tmp_path):
    import threading

    started, release = threading.Event(), threading.Event()

    def slow_runner(args, method):
        started.set()
        assert release.wait(30)
        return run.run(args, method)

    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    put_case(inp, "a.nii.gz")
    with client_for(inp, out, runner=slow_runner) as client:
        first = {}
        worker = threading.Thread(target=lambda: first.update(response=client.post("/invoke")))
        worker.start()
        assert started.wait(30)
        second = client.post("/invoke")
        assert second.status_code == 409 and "is running" in second.json()["errors"][0]
        assert client.get("/health").status_code == 200
        release.set()
        worker.join(60)
        assert first["response"].status_code == 201 and "a_CMB.nii.gz" in first["response"].json()["outputs"]
        assert client.post("/invoke").json()["invocation"] == 2   # the refused one was not counted


def test_an_oversized_request_body_is_refused(tmp_path):
    from valdocmb.core.serve import MAX_BODY_BYTES

    with client_for(tmp_path, tmp_path / "out") as client:
        response = client.post("/invoke", content=b"x" * (MAX_BODY_BYTES + 1))
    assert response.status_code == 413


def start_server(inp, out, port):
    env = {**os.environ, "CMB_PRECISION": "float32"}
    server = subprocess.Popen([sys.executable, str(ROOT / "process.py"), "--serve", "--port", str(port),
                               "--input", str(inp), "--output", str(out), "--device", "cpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while True:
        try:
            request(f"http://127.0.0.1:{port}/health", timeout=5)
            return server
        except (urllib.error.URLError, ConnectionError):
            assert server.poll() is None and time.time() < deadline, "the server never became healthy"
            time.sleep(0.5)


def test_sigterm_mid_invocation_stops_within_3_s_and_removes_its_outputs(tmp_path):
    # grand-challenge's runner sends SIGKILL 5 s after SIGTERM; uvicorn alone waited for the invocation to end
    import signal
    import threading

    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    big = make_image(brain_like((96, 256, 256), seed=3), (0.5, 0.5, 0.8))   # many seconds of CPU inference
    sitk.WriteImage(big, str(inp / "big.nii.gz"))
    port = free_port()
    server = start_server(inp, out, port)
    try:
        answer = {}
        caller = threading.Thread(target=lambda: answer.update(
            reply=request(f"http://127.0.0.1:{port}/invoke", method="POST", timeout=60)), daemon=True)
        caller.start()
        time.sleep(4)                                   # inside the invocation (reading, then the networks)
        assert server.poll() is None and not answer, "the invocation ended before the test could stop it"
        sent = time.time()
        server.send_signal(signal.SIGTERM)
        progress, errors = server.communicate(timeout=30)
        stopped_in = time.time() - sent
    finally:
        if server.poll() is None:
            server.kill()
    print(f"stopped in {stopped_in:.2f} s; last stderr line: {errors.strip().splitlines()[-1]}")
    assert stopped_in < 3, (stopped_in, errors[-2000:])
    assert not list(out.rglob("*_CMB*")) and not list(out.rglob(".tmp-*"))
    assert "big.nii.gz: interrupted (SIGTERM)" in errors.strip().splitlines()[-1], errors[-2000:]


def test_sigterm_while_loading_stops_at_once_and_says_so(tmp_path):
    import signal

    env = {**os.environ, "CMB_PRECISION": "float32"}
    server = subprocess.Popen([sys.executable, str(ROOT / "process.py"), "--serve", "--port", str(free_port()),
                               "--input", str(tmp_path), "--output", str(tmp_path / "out"), "--device", "cpu"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        while "invoke mode" not in server.stdout.readline():   # loading has begun
            assert server.poll() is None
        sent = time.time()
        server.send_signal(signal.SIGTERM)
        _, errors = server.communicate(timeout=30)
        stopped_in = time.time() - sent
    finally:
        if server.poll() is None:
            server.kill()
    assert stopped_in < 3 and server.returncode == 143, (stopped_in, server.returncode, errors[-2000:])
    assert "stopped by SIGTERM while loading" in errors.strip().splitlines()[-1]


def test_a_client_that_hangs_up_mid_invocation_leaves_the_server_healthy(tmp_path):
    inp, out = tmp_path / "input", tmp_path / "output"
    inp.mkdir()
    sitk.WriteImage(make_image(brain_like((40, 160, 160), seed=4), (0.5, 0.5, 0.8)), str(inp / "a.nii.gz"))
    port = free_port()
    server = start_server(inp, out, port)
    try:
        with pytest.raises((TimeoutError, urllib.error.URLError)):
            request(f"http://127.0.0.1:{port}/invoke", method="POST", timeout=0.5)   # hangs up at once
        assert request(f"http://127.0.0.1:{port}/health", timeout=10)[0] == 200
        deadline = time.time() + 120
        while True:   # the abandoned invocation finishes; the next one is served normally
            status, body = request(f"http://127.0.0.1:{port}/invoke", method="POST")
            if status != 409:
                break
            assert time.time() < deadline
            time.sleep(1)
        assert status == 201 and "a_CMB.nii.gz" in body["outputs"], body
    finally:
        server.terminate()
        server.communicate(timeout=30)
