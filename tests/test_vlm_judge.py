"""The ``vlm-judge`` reward against a small OpenAI-compatible chat server on loopback that answers
with canned completions (a protocol fixture: it checks what a vLLM/sglang server would receive —
the model name, the key, base64 PNG images of the right size, the filled prompt template — and
answers as a judge might, well or badly)."""

from __future__ import annotations

import base64
import http.server
import io
import json
import re
import threading
from collections.abc import Iterator

import pytest
import torch
from PIL import Image

from dancecore.config.schema import RewardFailureConfig
from dancecore.serving.judge import JudgeError, VLMJudge, parse_score
from dancecore.testing import check_reward_plugin
from dancecore.training.scoring import NamedReward, RewardFailure, score_samples

torch.set_num_threads(1)
KEY = "sk-test"

#: caption -> the judge's canned answer
ANSWERS = {
    "a red cube": "Score: 8",
    "a blue sphere": "The sphere is nicely lit.\nScore: 6.5",
    "a green cone": "SCORE = 3",
    "unparseable": "I cannot rate this image.",
    "out of range": "Score: 42",
    "two scores": "Score: 4. On reflection, Score: 9",
}


class _FakeChatServer(http.server.BaseHTTPRequestHandler):
    seen: list[dict] = []

    def log_message(self, *args) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        if self.path != "/v1/chat/completions" or self.headers.get("authorization") != f"Bearer {KEY}":
            self._send(401, {"error": {"message": "bad key or path"}})
            return
        content = body["messages"][-1]["content"]
        images = []
        for part in content:
            if part["type"] == "image_url":
                head, data = part["image_url"]["url"].split(",", 1)
                assert head == "data:image/png;base64"
                images.append(Image.open(io.BytesIO(base64.b64decode(data)), formats=["PNG"]).size)
        text = content[-1]["text"]
        caption = text.split('"')[1]
        self.seen.append({"model": body["model"], "images": images, "text": text, "temperature": body["temperature"]})
        if caption == "server error":
            self._send(500, {"error": {"message": "engine crashed"}})
            return
        answer = {"role": "assistant", "content": ANSWERS.get(caption, "Score: 5")}
        self._send(200, {"object": "chat.completion", "choices": [{"index": 0, "message": answer}]})

    def _send(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def chat_server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeChatServer)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def judge(chat_server: str, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("JUDGE_KEY", KEY)

    def make(**options) -> VLMJudge:
        options = {"base_url": chat_server, "model": "unified-reward-qwen", "api_key_env": "JUDGE_KEY", **options}
        return VLMJudge(VLMJudge.Config(**options))

    return make


def test_scores_are_parsed_from_the_answers_and_the_request_is_what_an_engine_expects(judge) -> None:
    _FakeChatServer.seen.clear()
    prompts = ["a red cube", "a blue sphere", "a green cone"]
    scores = judge().score(torch.rand(3, 3, 12, 20), prompts)
    assert scores.tolist() == [8.0, 6.5, 3.0]
    seen = sorted(_FakeChatServer.seen, key=lambda s: s["text"])
    assert {s["model"] for s in seen} == {"unified-reward-qwen"} and all(s["temperature"] == 0.0 for s in seen)
    assert all(s["images"] == [(20, 12)] for s in seen)  # one PNG per image, width x height
    red = [s["text"] for s in seen if '"a red cube"' in s["text"]]
    assert len(red) == 1 and 'caption: "a red cube"' in red[0] and "from 1 (worst) to 10 (best)" in red[0]
    normalized = judge(normalize=True).score(torch.rand(1, 3, 8, 8), ["a red cube"])
    assert normalized.tolist() == pytest.approx([7 / 9])


def test_a_video_sends_spread_frames(judge) -> None:
    _FakeChatServer.seen.clear()
    assert judge(max_frames=3).score(torch.rand(1, 7, 3, 8, 8), ["a red cube"]).tolist() == [8.0]
    assert _FakeChatServer.seen[0]["images"] == [(8, 8)] * 3


@pytest.mark.parametrize(
    ("caption", "why"),
    [
        ("unparseable", "no score in the answer"),
        ("out of range", "score 42 is outside [1, 10]"),
        ("two scores", "several different scores"),
    ],
)
def test_an_answer_without_a_usable_score_is_a_failure_naming_url_sample_and_answer(judge, caption, why) -> None:
    with pytest.raises(JudgeError, match=re.escape(why)) as info:
        judge().score(torch.rand(2, 3, 8, 8), ["a red cube", caption])
    message = str(info.value)
    assert "/v1/chat/completions (unified-reward-qwen): sample 1" in message and ANSWERS[caption][:20] in message


def test_failures_go_through_the_reward_failure_policy(judge) -> None:
    named = NamedReward("judge", 1.0, judge(retries=1, backoff_s=0.01), plugin="vlm-judge")
    with pytest.raises(RewardFailure, match=r"server error 500: .*engine crashed.*after 2 attempts"):
        score_samples(
            [named],
            torch.rand(2, 3, 8, 8),
            ["a red cube", "server error"],
            torch.tensor([0, 0]),
            RewardFailureConfig(policy="fail"),
        )
    with pytest.raises(RewardFailure, match=r"refused the request \(401\)"):
        bad_key = NamedReward("judge", 1.0, judge(api_key_env="NO_SUCH_VARIABLE"), plugin="vlm-judge")
        score_samples([bad_key], torch.rand(1, 3, 8, 8), ["a red cube"], torch.tensor([0]), RewardFailureConfig())


def test_the_judge_honours_the_reward_contract(chat_server, monkeypatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", KEY)
    check_reward_plugin(
        "vlm-judge",
        {"base_url": chat_server, "model": "m", "api_key_env": "JUDGE_KEY"},
        prompts=["a red cube", "a blue sphere", "a green cone", "a yellow torus"],
    )


def test_the_parser_and_the_options_are_strict() -> None:
    assert parse_score("score: 7.25", r"score\s*[:=]\s*(-?\d+(?:\.\d+)?)", 0, 10) == 7.25
    with pytest.raises(ValueError, match="group"):
        VLMJudge.Config(base_url="http://x/v1", model="m", answer_pattern=r"score: \d+")
    with pytest.raises(ValueError, match="low < high"):
        VLMJudge.Config(base_url="http://x/v1", model="m", score_range=(5, 1))
