"""A minimal OpenAI-compatible chat-completions stand-in for the llm_judge tests (the real
endpoint, the run's Ray Serve ``openai`` app, is built elsewhere and tested with the judge after
merge). It answers ``POST /v1/chat/completions`` in OpenAI's reply shape (openai/openai-python
``src/openai/types/chat/chat_completion.py``), checks the bearer key, and judges the template
``Answer: X`` / ``Reference: Y``: "Yes." when X == Y, "no" otherwise, "maybe" when X is "?".
It records the requests and the most requests it held at once."""
from __future__ import annotations

import html
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StandIn:
    def __init__(self, api_key: str, delay_s: float = 0.05):
        self.api_key, self.delay_s = api_key, delay_s
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def verdict(self, content: str) -> str:
        answer = html.unescape(re.search(r"<answer>(.*?)</answer>", content, re.S).group(1)).strip()
        reference = html.unescape(re.search(r"<reference>(.*?)</reference>", content, re.S).group(1)).strip()
        return "maybe" if answer == "?" else ("Yes." if answer == reference else "no")

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": "not found"}})
                if self.headers.get("Authorization") != f"Bearer {standin.api_key}":
                    return self._send(401, {"error": {"message": "bad key"}})
                with standin.lock:
                    standin.requests.append(body)
                    standin.in_flight += 1
                    standin.max_in_flight = max(standin.max_in_flight, standin.in_flight)
                time.sleep(standin.delay_s)
                with standin.lock:
                    standin.in_flight -= 1
                content = standin.verdict(body["messages"][-1]["content"])
                self._send(200, {"id": "chatcmpl-0", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": content}}]})

        return Handler
