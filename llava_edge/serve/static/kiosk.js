// The kiosk page: one image (a camera snapshot or an upload), a conversation about it, answers streamed
// from this server's /v1/chat/completions. Follow-up questions resend the same image bytes, so the
// server's image-embedding and prefix caches serve them without encoding the frame again.
"use strict";

const $ = (id) => document.getElementById(id);
const MAX_TOKENS = 128;
const UPLOAD_AS_IS = 4 * 1024 * 1024; // larger files are scaled down in the page before sending
// tokens/s is shown only over a span that can measure it: 2 tokens 1 ms apart would read "1000 tok/s"
const RATE_MIN_TOKENS = 4;
const RATE_MIN_SPAN_MS = 200;

// held: the question a 401 stopped ({ question, bubble, frame }); sent again once a key is saved
const state = { frame: null, turns: [], stream: null, busy: false, controller: null, held: null,
                key: localStorage.getItem("llava-edge-key") || "" };

function setStats(text, kind) { const s = $("stats"); s.textContent = text; s.dataset.state = kind; }

function showError(text) {
  const e = $("error");
  e.textContent = text;
  e.hidden = !text;
  if (text) setStats("Stopped", "error");
}

function plainWords(status, body) {
  const code = body && body.error && body.error.code;
  const message = body && body.error && body.error.message;
  if (status === 401) { $("key-form").hidden = false; return "This server needs an API key. Enter it below."; }
  if (status === 413) return "That image is too large for this server. Try a smaller photo.";
  if (status === 429) return "The kiosk is busy answering other people. Please try again in a moment.";
  if (status === 503) return "The model is still starting up. Please try again in a few seconds.";
  if (code === "context_length_exceeded") return "The conversation is too long for the model. Tap Reset to start again.";
  if (code === "invalid_image" || code === "invalid_base64") return "The server could not read that image. Try another one.";
  if (message) return "The server refused the question: " + message;
  return "The server answered with an error (HTTP " + status + ").";
}

// -- the frame -----------------------------------------------------------------------------------
function showFrame(dataUrl) {
  state.frame = dataUrl;
  state.turns = [];
  state.held = null;
  $("log").replaceChildren();
  const img = $("frame");
  img.src = dataUrl;
  img.hidden = false;
  $("video").hidden = true;
  $("placeholder").hidden = true;
  $("stage").classList.remove("empty");
  if (state.stream) $("camera").textContent = "Live view";
  showError("");
  setStats("Ready", "idle");
}

function readFile(file) {
  if (!file || !file.type.startsWith("image/")) { showError("That file is not an image."); return; }
  const reader = new FileReader();
  reader.onerror = () => showError("The image could not be read.");
  reader.onload = () => {
    if (file.size <= UPLOAD_AS_IS) { showFrame(reader.result); return; }
    const img = new Image();
    img.onerror = () => showError("The image could not be read.");
    img.onload = () => {
      const scale = Math.min(1, 1536 / Math.max(img.width, img.height));
      showFrame(toJpeg(img, img.width * scale, img.height * scale));
    };
    img.src = reader.result;
  };
  reader.readAsDataURL(file);
}

function toJpeg(source, w, h) {
  const c = document.createElement("canvas");
  c.width = Math.max(1, Math.round(w));
  c.height = Math.max(1, Math.round(h));
  c.getContext("2d").drawImage(source, 0, 0, c.width, c.height);
  return c.toDataURL("image/jpeg", 0.9);
}

async function toggleCamera() {
  const video = $("video");
  if (state.stream && state.frame) { liveView(); return; }
  if (state.stream) { stopCamera(); return; }
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    showError("This browser cannot use a camera here (the page must be opened over https or from localhost).");
    return;
  }
  try {
    state.stream = await navigator.mediaDevices.getUserMedia({ video: { width: { ideal: 1280 } }, audio: false });
  } catch (err) {
    showError(err && err.name === "NotAllowedError" ? "The camera is blocked. Allow camera access and try again."
                                                    : "No camera could be opened.");
    return;
  }
  video.srcObject = state.stream;
  await video.play().catch(() => {});
  $("snap").disabled = false;
  liveView();
}

function liveView() {
  state.frame = null;
  state.turns = [];
  state.held = null;
  $("log").replaceChildren();
  $("frame").hidden = true;
  $("video").hidden = false;
  $("placeholder").hidden = true;
  $("stage").classList.remove("empty");
  $("camera").textContent = "Stop camera";
  showError("");
  setStats("Ready", "idle");
}

function stopCamera() {
  state.stream.getTracks().forEach((t) => t.stop());
  state.stream = null;
  $("video").hidden = true;
  $("snap").disabled = true;
  $("camera").textContent = "Camera";
  if (!state.frame) { $("placeholder").hidden = false; $("stage").classList.add("empty"); }
}

function snapshot() {
  const v = $("video");
  if (!state.stream || !v.videoWidth) { showError("The camera has no picture yet."); return false; }
  showFrame(toJpeg(v, v.videoWidth, v.videoHeight));
  return true;
}

// -- asking --------------------------------------------------------------------------------------
function messages(question) {
  const out = [];
  state.turns.forEach((t, i) => {
    out.push(i === 0 ? { role: "user", content: [{ type: "image_url", image_url: { url: state.frame } },
                                                   { type: "text", text: t.q }] }
                     : { role: "user", content: t.q });
    out.push({ role: "assistant", content: t.a });
  });
  out.push(state.turns.length === 0
    ? { role: "user", content: [{ type: "image_url", image_url: { url: state.frame } }, { type: "text", text: question }] }
    : { role: "user", content: question });
  return out;
}

function bubble(cls, text) {
  const div = document.createElement("div");
  div.className = cls;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

// held: the bubble of a question a 401 stopped, sent again as it is (no second bubble)
async function ask(question, held) {
  question = (question || "").trim();
  if (state.busy) return;
  if (!question) { showError("Type a question, or tap one of the suggestions."); return; }
  if (!state.frame && state.stream && !snapshot()) return;
  if (!state.frame) { showError("Start the camera or upload an image first."); return; }
  showError("");
  $("question").value = "";
  if (state.held && state.held.bubble !== held) state.held.bubble.remove(); // a new question replaces it
  state.held = null;
  const body = { messages: messages(question), stream: true, temperature: 0, max_tokens: MAX_TOKENS,
                 stream_options: { include_usage: true } };
  const asked = held || bubble("q", question);
  asked.classList.remove("held");
  const answer = bubble("a", "");
  answer.id = "answer";
  document.querySelectorAll(".a").forEach((a) => { if (a !== answer) a.removeAttribute("id"); });
  setBusy(true);
  setStats("Thinking…", "running");
  const t0 = performance.now();
  let first = null, last = null, tokens = 0, text = "";
  const headers = { "Content-Type": "application/json" };
  if (state.key) headers.Authorization = "Bearer " + state.key;
  state.controller = new AbortController();
  try {
    const res = await fetch("/v1/chat/completions", { method: "POST", headers, body: JSON.stringify(body),
                                                      signal: state.controller.signal });
    if (!res.ok) {
      let err = null;
      try { err = await res.json(); } catch (_) { /* not JSON */ }
      const refused = new Error(plainWords(res.status, err));
      refused.status = res.status;
      throw refused;
    }
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = "", done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") { done = true; break; }
        const obj = JSON.parse(data);
        if (obj.error) throw new Error("The model stopped with an error: " + obj.error.message);
        const choice = obj.choices && obj.choices[0];
        if (!choice) continue;
        const ids = choice.token_ids || [];
        if (ids.length) {
          const now = performance.now();
          if (first === null) first = now;
          last = now;
          tokens += ids.length;
        }
        if (choice.delta && choice.delta.content) {
          text += choice.delta.content;
          answer.textContent = text;
          $("log").scrollTop = $("log").scrollHeight;
        }
        if (first !== null) setStats(statsLine(t0, first, last, tokens), "running");
      }
    }
    text = text.trim();
    answer.textContent = text;
    state.turns.push({ q: question, a: text });
    setStats(first === null ? "No answer" : statsLine(t0, first, last, tokens), "done");
  } catch (err) {
    answer.remove();
    if (err.status === 401) {
      // kept, dimmed, and sent by itself once the key is saved
      asked.classList.add("held");
      state.held = { question, bubble: asked, frame: state.frame };
      $("key").focus();
    } else {
      // not left in the log unanswered: the question goes back into the box, one tap to send it again
      asked.remove();
      if (!$("question").value) $("question").value = question;
    }
    const msg = err.name === "AbortError" ? "" :
      (err instanceof TypeError ? "Cannot reach the server. Check that it is running." : err.message);
    if (msg) showError(msg); else setStats("Ready", "idle");
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

function statsLine(t0, first, last, tokens) {
  const parts = [`First token ${Math.round(first - t0)} ms`];
  const span = last - first; // the rate is over the tokens after the first: the first one's wait is the TTFT
  if (tokens >= RATE_MIN_TOKENS && span >= RATE_MIN_SPAN_MS) {
    parts.push(`${((tokens - 1) / (span / 1000)).toFixed(1)} tok/s`);
  }
  parts.push(tokens === 1 ? "1 token" : `${tokens} tokens`);
  return parts.join(" · ");
}

function setBusy(busy) {
  state.busy = busy;
  $("ask").disabled = busy;
  document.querySelectorAll(".suggestion").forEach((b) => { b.disabled = busy; });
}

function reset() {
  if (state.controller) state.controller.abort();
  $("question").value = "";
  $("key-form").hidden = true;
  state.held = null;
  if (state.stream) { liveView(); return; }
  state.frame = null;
  state.turns = [];
  $("log").replaceChildren();
  $("frame").hidden = true;
  $("frame").removeAttribute("src");
  $("placeholder").hidden = false;
  $("stage").classList.add("empty");
  showError("");
  setStats("Ready", "idle");
}

// -- wiring --------------------------------------------------------------------------------------
$("camera").addEventListener("click", toggleCamera);
$("snap").addEventListener("click", () => { if (snapshot()) ask($("question").value || "What is in the image?"); });
$("file").addEventListener("change", (e) => { readFile(e.target.files[0]); e.target.value = ""; });
$("ask-form").addEventListener("submit", (e) => { e.preventDefault(); ask($("question").value); });
$("reset").addEventListener("click", reset);
document.querySelectorAll(".suggestion").forEach((b) => b.addEventListener("click", () => ask(b.textContent)));
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.key = $("key").value.trim();
  localStorage.setItem("llava-edge-key", state.key);
  $("key-form").hidden = true;
  showError("");
  const held = state.held;
  if (held && held.frame === state.frame && held.bubble.isConnected) ask(held.question, held.bubble);
});
const stage = $("stage");
stage.addEventListener("dragover", (e) => { e.preventDefault(); stage.classList.add("drop"); });
stage.addEventListener("dragleave", () => stage.classList.remove("drop"));
stage.addEventListener("drop", (e) => {
  e.preventDefault();
  stage.classList.remove("drop");
  if (e.dataTransfer.files.length) readFile(e.dataTransfer.files[0]);
});
