// ConSLU page: send audio to POST /v1/parse (a dropped or chosen file, or a microphone recording
// encoded here as 16-bit PCM wav) and draw the answer: transcript, logical form, tree, timing.
"use strict";

const statusEl = document.getElementById("status");
const resultEl = document.getElementById("result");
const recordBtn = document.getElementById("record");
const drop = document.getElementById("drop");

function say(text, isError) {
  statusEl.textContent = text;
  statusEl.className = isError ? "error" : "";
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

// the tree as nested boxes: intents blue, slots green, words as chips
function drawTree(node) {
  const box = el("div", "node " + (node.label.startsWith("IN:") ? "intent" : "slot"));
  box.dataset.label = node.label;
  box.appendChild(el("div", "label", node.label));
  const kids = el("div", "kids");
  for (const child of node.children) {
    kids.appendChild(typeof child === "string" ? el("span", "word", child) : drawTree(child));
  }
  box.appendChild(kids);
  return box;
}

function show(res) {
  resultEl.replaceChildren();
  resultEl.appendChild(el("div", "transcript", res.transcript || "(no words)"));
  resultEl.appendChild(el("div", "lf", res.logical_form || "(no logical form)"));
  const tree = el("div", "tree");
  tree.id = "tree";
  if (res.tree) tree.appendChild(drawTree(res.tree));
  resultEl.appendChild(tree);
  resultEl.appendChild(el("p", "timing",
    `${res.valid ? "valid tree" : "no valid tree"} · ${res.audio_seconds.toFixed(1)} s of audio · ` +
    `answered in ${(res.seconds * 1000).toFixed(0)} ms (decode ${(res.decode_seconds * 1000).toFixed(0)} ms, ` +
    `batch of ${res.batch_size})`));
}

async function send(body, name) {
  say(`parsing ${name} ...`);
  try {
    const r = await fetch("/v1/parse", { method: "POST", body });
    const res = await r.json();
    if (!r.ok) { say(res.error || `error ${r.status}`, true); return; }
    say(`${name}: done`);
    show(res);
  } catch (e) {
    say(`request failed: ${e}`, true);
  }
}

function sendFile(file) {
  const form = new FormData();
  form.append("file", file, file.name);
  send(form, file.name);
}

document.getElementById("file").addEventListener("change", (ev) => {
  if (ev.target.files.length) sendFile(ev.target.files[0]);
});
drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (ev) => {
  ev.preventDefault();
  drop.classList.remove("over");
  if (ev.dataTransfer.files.length) sendFile(ev.dataTransfer.files[0]);
});

// --- microphone: raw samples through an AudioContext, encoded as a mono 16-bit wav
function wav(chunks, rate) {
  const n = chunks.reduce((a, c) => a + c.length, 0);
  const buf = new ArrayBuffer(44 + 2 * n);
  const v = new DataView(buf);
  const str = (o, s) => { for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i)); };
  str(0, "RIFF"); v.setUint32(4, 36 + 2 * n, true); str(8, "WAVE"); str(12, "fmt ");
  v.setUint32(16, 16, true); v.setUint16(20, 1, true); v.setUint16(22, 1, true);
  v.setUint32(24, rate, true); v.setUint32(28, 2 * rate, true); v.setUint16(32, 2, true); v.setUint16(34, 16, true);
  str(36, "data"); v.setUint32(40, 2 * n, true);
  let o = 44;
  for (const c of chunks) for (let i = 0; i < c.length; i++, o += 2) {
    const s = Math.max(-1, Math.min(1, c[i]));
    v.setInt16(o, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Blob([buf], { type: "audio/wav" });
}

let rec = null;
recordBtn.addEventListener("click", async () => {
  if (rec) {  // stop and send
    const { ctx, stream, node, chunks } = rec;
    rec = null;
    node.disconnect();
    stream.getTracks().forEach((t) => t.stop());
    await ctx.close();
    recordBtn.textContent = "Record";
    recordBtn.classList.remove("stop");
    send(wav(chunks, ctx.sampleRate), "recording");
    return;
  }
  try {
    const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    const ctx = new AudioContext();
    const source = ctx.createMediaStreamSource(stream);
    const node = ctx.createScriptProcessor(4096, 1, 1);
    const chunks = [];
    node.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
    source.connect(node);
    node.connect(ctx.destination);
    rec = { ctx, stream, node, chunks };
    recordBtn.textContent = "Stop and parse";
    recordBtn.classList.add("stop");
    say("recording ... (at most 30 s)");
  } catch (e) {
    say(`no microphone: ${e.message || e}`, true);
  }
});
