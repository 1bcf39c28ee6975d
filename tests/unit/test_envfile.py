"""shared.envfile: what write_env_file writes, read_env_file reads back unchanged; hand-written files parse."""

from __future__ import annotations

import os
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.envfile import load_env_file, read_env_file, write_env_file

KEYS = st.from_regex(r"[A-Z_][A-Z0-9_]{0,20}", fullmatch=True)
# Any text but NUL and CR (a text file reads CR back as a newline); quotes, backslashes, '#', '$', newlines included.
VALUES = st.one_of(
    st.text(st.characters(blacklist_characters="\x00\r", blacklist_categories=("Cs",)), max_size=40),
    st.from_regex(r"[A-Za-z0-9_./:@,+=%-]{0,30}", fullmatch=True),  # written bare
)


@settings(max_examples=300, deadline=None)
@given(env=st.dictionaries(KEYS, VALUES, max_size=8))
def test_write_then_read_round_trips(tmp_path_factory, env):
    path = tmp_path_factory.mktemp("env") / "stack.env"
    write_env_file(path, env)
    assert read_env_file(path) == env


def test_plain_values_stay_plain_key_value_lines(tmp_path):
    env = {"UPCFAN_API_URL": "http://127.0.0.1:8100", "UPCFAN_QUEUE": "projects/demo-upcfan/locations/us-central1/"
           "queues/upcfan-items", "FIRESTORE_EMULATOR_HOST": "127.0.0.1:8080", "EMPTY": ""}
    path = tmp_path / "stack.env"
    write_env_file(path, env)
    assert path.read_text() == "".join(f"{k}={v}\n" for k, v in env.items())


def test_stack_env_is_sourceable_by_a_shell(tmp_path):
    env = {"UPCFAN_API_URL": "http://127.0.0.1:8100", "UPCFAN_STACK_LOGS": "/w/.local/logs", "X": "a b#c $HOME"}
    path = tmp_path / "stack.env"
    write_env_file(path, env)
    assert "X='a b#c $HOME'" in path.read_text()
    out = subprocess.run(["bash", "-c", f'set -a; . "{path}"; printf "%s|" "$UPCFAN_API_URL" "$UPCFAN_STACK_LOGS" "$X"'],
                         capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert out.stdout == "http://127.0.0.1:8100|/w/.local/logs|a b#c $HOME|"


def test_rewrite_replaces_the_whole_file(tmp_path):
    path = tmp_path / "stack.env"
    write_env_file(path, {"A": "1", "B": "2"})
    write_env_file(path, {"C": "3"})
    assert read_env_file(path) == {"C": "3"}
    write_env_file(path, {})
    assert read_env_file(path) == {}
    assert [p.name for p in tmp_path.iterdir()] == ["stack.env"]


def test_hand_written_file(tmp_path):
    path = tmp_path / "other.env"
    path.write_text(
        "# local stack\nexport UPCFAN_TEST_MARKER='from-file'\n\nGOOGLE_CLOUD_PROJECT=demo-x\n"
        'DOUBLE="a b"\nTRAILING=plain # a comment\nLITERAL=${HOME}\nNO_EQUALS\n'
    )
    assert read_env_file(path) == {
        "UPCFAN_TEST_MARKER": "from-file", "GOOGLE_CLOUD_PROJECT": "demo-x", "DOUBLE": "a b",
        "TRAILING": "plain", "LITERAL": "${HOME}",
    }


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_env_file(tmp_path / "nope.env")


def test_load_sets_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UPCFAN_TEST_MARKER", "before")
    path = tmp_path / "x.env"
    write_env_file(path, {"UPCFAN_TEST_MARKER": "from-file"})
    assert load_env_file(path) == {"UPCFAN_TEST_MARKER": "from-file"}
    assert os.environ["UPCFAN_TEST_MARKER"] == "from-file"


def test_a_secrets_file_is_private_from_its_creation(tmp_path, monkeypatch):
    """mode=0o600: never readable by others, not even for a moment, whatever the umask or an old file."""
    path = tmp_path / "secrets.env"
    path.write_text("OLD=1\n")
    path.chmod(0o644)
    seen = []
    import shared.envfile as envfile

    real_set_key = envfile.set_key
    monkeypatch.setattr(envfile, "set_key", lambda p, *a, **k: (seen.append(os.stat(p).st_mode & 0o777),
                                                                 real_set_key(p, *a, **k))[1])
    old_umask = os.umask(0)
    try:
        write_env_file(path, {"UPCFAN_MARKETPLACE_API_KEY": "s3cret", "B": "2"}, mode=0o600)
    finally:
        os.umask(old_umask)
    assert seen and set(seen) == {0o600}
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert read_env_file(path) == {"UPCFAN_MARKETPLACE_API_KEY": "s3cret", "B": "2"}
