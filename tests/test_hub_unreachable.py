"""A token check (Push) with no Hub to ask says the Hub can't be reached, not "not in the local cache … use
`base_model: demo`", which only makes sense for downloads."""

from __future__ import annotations

import socket

import pytest

from finetune.errors import HubError
from finetune.hub import check_token


def test_offline_token_check_says_the_hub_cant_be_reached(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the client reads it once, when first imported
    with pytest.raises(HubError) as e:
        check_token("hf_" + "x" * 34)
    assert str(e.value) == ("the Hugging Face Hub can't be reached: offline mode is on (HF_HUB_OFFLINE), so your "
                            "token can't be checked; unset HF_HUB_OFFLINE and connect, then try again")


def test_token_check_without_network_says_the_hub_cant_be_reached(monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused, as with no network
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # a suite-wide offline switch must not block 127.0.0.1
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port}")
    with pytest.raises(HubError) as e:
        check_token("hf_" + "x" * 34)
    assert str(e.value) == (f"can't reach the Hugging Face Hub (http://127.0.0.1:{closed_port}), so your token "
                            "can't be checked; check your connection or proxy, then try again")
