"""The shipped corpus is read without the network; a hub source that cannot be reached fails at once, in one line."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh process with an audit hook that records every connection the process makes or name it resolves
# (importing some packages binds a local socket pair; that is not the network).
PROBE = textwrap.dedent("""
    import json, sys, time
    sys.path.insert(0, {root!r})
    events = []
    NETWORK = {{"socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
                "socket.sendto"}}
    sys.addaudithook(lambda event, args: events.append(event) if event in NETWORK else None)
    import datasets  # installed (the test extra): the old default tried the hub through it
    from utils.data import load_wikitext
    started = time.perf_counter()
    outcome = {{}}
    try:
        splits = [load_wikitext(split, **{kwargs}) for split in ("train", "validation")]
        outcome["lines"] = [len(s) for s in splits]
        outcome["sources"] = [s.source for s in splits]
    except Exception as error:
        outcome["error"] = f"{{type(error).__name__}}: {{error}}"
    outcome["seconds"] = time.perf_counter() - started
    outcome["socket_events"] = sorted(set(events))
    print(json.dumps(outcome))
""")


def _probe(kwargs: str, **env):
    done = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT), kwargs=kwargs)], capture_output=True,
                          text=True, timeout=300, env={**_clean_env(), **env})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def _clean_env():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_ENDPOINT")}


def test_the_default_reads_the_shipped_corpus_without_opening_a_socket():
    outcome, stderr = _probe("{}")
    assert outcome["socket_events"] == [], outcome
    assert outcome["lines"][0] > 1000 and outcome["lines"][1] > 100
    assert all(source.startswith("gensim") for source in outcome["sources"])
    assert "Retrying" not in stderr
    assert outcome["seconds"] < 30  # the old default waited ~50 s on hub retries here; measured ~3 s (CLAUDE.md)


def test_a_hub_source_that_cannot_be_reached_fails_at_once_with_one_clear_error():
    # Port 9 on loopback: nothing listens there, so the connection is refused (a real network failure, no download).
    outcome, stderr = _probe("dict(source='hub')", HF_ENDPOINT="http://127.0.0.1:9")
    assert outcome["error"].startswith("ConnectionError: WikiText-2 was asked for (source='hub')"), outcome
    assert "source='offline'" in outcome["error"]
    assert "Retrying" not in stderr
    assert outcome["seconds"] < 30


@pytest.mark.parametrize("env", [{"HF_ENDPOINT": "http://127.0.0.1:9"}, {"HF_HUB_OFFLINE": "1"}])
def test_auto_falls_back_to_the_shipped_corpus_with_one_warning(env):
    outcome, stderr = _probe("dict(source='auto')", **env)
    assert all(source.startswith("gensim") for source in outcome["sources"]), outcome
    assert stderr.count("WikiText-2 is not available") == 1 and "Retrying" not in stderr
