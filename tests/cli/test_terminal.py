"""What the terminal shows: Ray's known noise lines are dropped, everything else passes as it
came, progress-bar frames at once (cli.common.stderr_without_ray_noise), Ray-free."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

from kdpipe.cli.common import RAY_NOISE, _pump

# As Ray 2.60 printed them during a `kdpipe demo` on 2 cores.
ACTOR_LINE = (b"[2026-12-03 22:05:50,852 E 20728 20728] core_worker.cc:2465: Actor with class name: "
              b"'MapWorker(MapBatches(TeacherPredictor))' and ID: 'e712017d7154a8efb2585d2e01000000' has "
              b"constructor arguments in the object store and max_restarts > 0. If the arguments in the object "
              b"store go out of scope or are lost, the actor restart will fail. See "
              b"https://github.com/ray-project/ray/issues/53727 for more details.")
RAYLET_LINE = (b"\x1b[33m(raylet)\x1b[0m WARNING: 12 PYTHON worker processes have been started on node: cf6c42 with "
               b"address: 192.0.2.2, which is 6x the maximum expected startup concurrency (2). This could be a "
               b"result of using a large number of actors.\x1b[32m [repeated 2x across cluster]\x1b[0m")


def _filtered(chunks: list[bytes]) -> bytes:
    read_end, write_end = os.pipe()
    sink = io.BytesIO()
    pump = threading.Thread(target=_pump, args=(read_end, sink, RAY_NOISE))
    pump.start()
    for chunk in chunks:
        os.write(write_end, chunk)
    os.close(write_end)
    pump.join(timeout=10)
    return sink.getvalue()


def test_ray_noise_is_dropped_and_the_rest_passes_unchanged():
    kept = [b"kdpipe: teacher cnn: 1 actor(s) x 0.40 CPU\n", b"Traceback (most recent call last):\n",
            b"  File \"x.py\", line 1, in <module>\n", b"ValueError: the actor failed\n"]
    out = _filtered([kept[0], ACTOR_LINE + b"\n", RAYLET_LINE + b"\n" + kept[1], kept[2], kept[3]])
    assert out == b"".join(kept)
    # a line cut across writes is judged whole; the last line may lack its newline
    assert _filtered([ACTOR_LINE[:40], ACTOR_LINE[40:] + b"\nlast words"]) == b"last words"


def test_progress_bar_frames_pass_before_their_line_ends():
    read_end, write_end = os.pipe()
    sink = io.BytesIO()
    pump = threading.Thread(target=_pump, args=(read_end, sink, RAY_NOISE), daemon=True)
    pump.start()
    os.write(write_end, b"\rteacher mlp:  10%|# | 2/20\rteacher mlp:  20%|## | 4/20")
    for _ in range(200):
        if sink.getvalue():
            break
        threading.Event().wait(0.01)
    assert sink.getvalue() == b"\rteacher mlp:  10%|# | 2/20\r"  # the frame in progress waits
    os.close(write_end)
    pump.join(timeout=10)
    assert sink.getvalue().endswith(b"4/20")


def test_the_cli_filters_its_own_stderr_and_keeps_stdout_for_the_result():
    actor, raylet = ACTOR_LINE + b"\n", RAYLET_LINE + b"\n"
    code = ("import os, sys\n"
            "from kdpipe.cli.common import stderr_without_ray_noise, stdout_for_results_only, emit\n"
            "import argparse\n"
            "with stderr_without_ray_noise(), stdout_for_results_only():\n"
            f"    os.write(2, {actor!r})\n"
            f"    os.write(1, {raylet!r})\n"  # Ray prints these on stdout: they go to stderr
            "    print('kdpipe: working', file=sys.stderr)\n"
            "    emit(argparse.Namespace(json=True), {'ok': 1}, '')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == b'{"ok": 1}\n'
    assert out.stderr == b"kdpipe: working\n"
