"""`[cache]`'s remote keys in hitz.toml: what they become, and what a bad one says.

The exact text of the messages is asserted on purpose (STYLE 3).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hitz.executor.errors import ManifestError, ManifestErrorReason
from hitz.executor.manifest import load
from hitz.executor.model import Manifest
from hitz.executor.remote_config import RemoteCacheSettings

TASK = '\n[tasks.a]\nrun = "true"\n'


@pytest.fixture(autouse=True)
def in_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def load_cache(tmp_path: Path, cache: str) -> Manifest:
    Path("hitz.toml").write_text("[cache]\n" + textwrap.dedent(cache) + TASK)
    return load("hitz.toml", cache_dir=tmp_path / ".hitz")


def cache_error(tmp_path: Path, cache: str) -> ManifestError:
    with pytest.raises(ManifestError) as info:
        load_cache(tmp_path, cache)
    return info.value


def test_every_key_is_read(tmp_path: Path) -> None:
    text = """\
        remote = "grpcs://cache.example.com:443/"
        instance = "ci/main"
        upload = false
        token_file = "secrets/token"
        ca_file = "certs/ca.pem"
    """
    expected = RemoteCacheSettings("grpcs://cache.example.com:443", "ci/main", False, None,
                                   "secrets/token", "certs/ca.pem")
    assert load_cache(tmp_path, text).cache_remote == expected
    assert load_cache(tmp_path, text).cache_remote == expected  # the validated-manifest cache


def test_no_remote_by_default(tmp_path: Path) -> None:
    assert load_cache(tmp_path, "").cache_remote == RemoteCacheSettings()


def test_a_bad_address_names_the_line(tmp_path: Path) -> None:
    exc = cache_error(tmp_path, 'instance = "x"\nremote = "http://cache:80"\n')
    assert exc.message == ('hitz.toml:3: "remote" must be an address such as '
                           '"grpc://127.0.0.1:8980" or "grpcs://cache.example.com:443", '
                           'got "http://cache:80"')
    assert exc.reason is ManifestErrorReason.BAD_VALUE


def test_token_env_must_be_a_variable_name(tmp_path: Path) -> None:
    exc = cache_error(tmp_path, 'token_env = "abc def"\n')
    assert exc.message == ('hitz.toml:2: "token_env" must name an environment variable, '
                           'got "abc def"')
    assert exc.hint == ("put the token in a variable (or in a file: `token_file`) and name it "
                        "here; the token itself never goes in hitz.toml")


def test_token_env_and_token_file_exclude_each_other(tmp_path: Path) -> None:
    exc = cache_error(tmp_path, 'token_env = "T"\ntoken_file = "t"\n')
    assert exc.message == 'hitz.toml:3: set "token_env" or "token_file", not both'


def test_a_token_in_the_manifest_is_an_unknown_key(tmp_path: Path) -> None:
    exc = cache_error(tmp_path, 'token = "s3cret"\n')
    assert exc.reason is ManifestErrorReason.UNKNOWN_KEY
    assert "s3cret" not in exc.message


def test_upload_must_be_a_boolean(tmp_path: Path) -> None:
    exc = cache_error(tmp_path, 'upload = "no"\n')
    assert exc.reason is ManifestErrorReason.WRONG_TYPE
    assert exc.message == 'hitz.toml:2: "upload" must be true or false, got "no"'


def test_timeout_is_a_duration(tmp_path: Path) -> None:
    assert load_cache(tmp_path, 'timeout = "1m30s"\n').cache_remote.timeout_s == 90.0
    assert load_cache(tmp_path, "").cache_remote.timeout_s is None


@pytest.mark.parametrize("value, message, hint", [
    ('"10"', '"timeout" must be a duration such as "90s" or "5m", got "10"',
     'add a unit, such as "10s" or "10m"'),
    ('"0s"', '"timeout" must be longer than zero, got "0s"', None),
    ("10", '"timeout" must be a duration such as "90s" or "5m", got 10',
     'write it as a string with a unit, such as `timeout = "10s"` or `"10m"`'),
])
def test_a_bad_timeout_names_the_line(tmp_path: Path, value: str, message: str,
                                      hint: str | None) -> None:
    exc = cache_error(tmp_path, f'upload = true\ntimeout = {value}\n')
    assert exc.message.endswith(message)
    assert exc.message.startswith("hitz.toml:3: ")
    assert exc.hint == hint


def test_the_environment_overrides_the_manifests_timeout() -> None:
    from hitz.executor.remote_config import DEFAULT_TIMEOUT_S, ENV_TIMEOUT, timeout_s

    assert timeout_s(None, {}) == DEFAULT_TIMEOUT_S
    assert timeout_s(30.0, {}) == 30.0
    assert timeout_s(30.0, {ENV_TIMEOUT: "2.5"}) == 2.5
    for junk in ("", "abc", "0", "-1", "nan", "inf"):
        assert timeout_s(30.0, {ENV_TIMEOUT: junk}) == 30.0, junk


@pytest.mark.parametrize("token", ["two\nlines", "tab\there", "caf\u00e9"])
def test_a_token_a_header_cannot_carry_is_refused_by_name(tmp_path: Path, token: str) -> None:
    """gRPC refuses such a header on every call ("Invalid metadata"); hitz
    says what is wrong with the token, naming where it came from, never the token."""
    from hitz.executor.remote_config import load_token
    from hitz.executor.remote_errors import RemoteError, RemoteErrorReason

    (tmp_path / "token").write_text(token + "\n")
    with pytest.raises(RemoteError) as info:
        load_token(file=tmp_path / "token")
    assert info.value.message == (
        f"the remote cache token file `{tmp_path / 'token'}` holds characters an "
        "`authorization` header can't carry (only printable ASCII)")
    assert info.value.reason is RemoteErrorReason.UNAUTHENTICATED
    with pytest.raises(RemoteError) as info:
        load_token(env="T", environ={"T": token})
    assert info.value.message == (
        "the remote cache token variable `T` holds characters an `authorization` header "
        "can't carry (only printable ASCII)")
    assert token not in str(info.value)
