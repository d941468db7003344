// Streams the microphone to wenet-moe-server with WeNet's WebSocket protocol:
// start signal, 16 kHz 16-bit mono PCM frames, end signal; shows partial and final text.
(function () {
  'use strict';
  const TARGET_RATE = 16000;
  const SEND_MS = 100;                       // audio per binary frame
  const $ = (id) => document.getElementById(id);
  let ws = null, ctx = null, stream = null, node = null, source = null;
  let pending = [], pendingLen = 0, ready = false, resampler = null;

  function setStatus(text) { $('status').textContent = text; }

  // Linear-interpolation resampler from the device rate to 16 kHz; `pos` is
  // relative to the current block, index -1 being the previous block's last sample.
  // (No anti-aliasing filter: a box-filter variant decoded worse in the browser test.)
  function makeResampler(fromRate) {
    const step = fromRate / TARGET_RATE;
    let pos = 0, last = 0;
    return function (block) {
      const out = [];
      while (pos <= block.length - 1) {
        const i = Math.floor(pos), frac = pos - i;
        const a = i < 0 ? last : block[i];
        const b = i + 1 < block.length ? block[i + 1] : a;
        out.push(a + (b - a) * frac);
        pos += step;
      }
      pos -= block.length;
      last = block[block.length - 1];
      return out;
    };
  }

  function toInt16(samples) {
    const pcm = new Int16Array(samples.length);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      pcm[i] = s < 0 ? s * 32768 : s * 32767;
    }
    return pcm;
  }

  // Audio captured before `server_ready` is kept (up to 10 s) and sent first.
  function onAudio(block) {
    if (!ws || ws.readyState !== WebSocket.OPEN || !resampler) return;
    const samples = resampler(block);
    pending.push(samples);
    pendingLen += samples.length;
    if (!ready) {
      while (pendingLen > TARGET_RATE * 10 && pending.length > 1) pendingLen -= pending.shift().length;
      return;
    }
    flush(false);
  }

  function flush(force) {
    if (!ready || pendingLen === 0) return;
    if (!force && pendingLen < TARGET_RATE * SEND_MS / 1000) return;
    const all = new Float32Array(pendingLen);
    let off = 0;
    for (const p of pending) { all.set(p, off); off += p.length; }
    pending = []; pendingLen = 0;
    ws.send(toInt16(all).buffer);
  }

  function showFinal(text) {
    const p = document.createElement('p');
    p.className = 'final';
    p.textContent = text;
    $('finals').appendChild(p);
    $('partial').textContent = '';
  }

  function onMessage(event) {
    let msg;
    try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (msg.status !== 'ok') { setStatus('server: ' + msg.message); return; }
    if (msg.type === 'server_ready') { ready = true; setStatus('listening'); flush(true); }
    else if (msg.type === 'partial_result') {
      $('partial').textContent = JSON.parse(msg.nbest)[0].sentence;
    } else if (msg.type === 'final_result') {
      const nbest = JSON.parse(msg.nbest);
      if (nbest.length && nbest[0].sentence) showFinal(nbest[0].sentence);
    } else if (msg.type === 'speech_end') { setStatus('speech ended'); stopAudio(); }
  }

  async function startAudio() {
    stream = await navigator.mediaDevices.getUserMedia(
      { audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false } });
    ctx = new (window.AudioContext || window.webkitAudioContext)();
    if (ctx.state === 'suspended') await ctx.resume();
    resampler = makeResampler(ctx.sampleRate);
    source = ctx.createMediaStreamSource(stream);
    if (ctx.audioWorklet) {
      await ctx.audioWorklet.addModule('pcm-worklet.js');
      node = new AudioWorkletNode(ctx, 'pcm-forwarder');
      node.port.onmessage = (e) => onAudio(e.data);
      source.connect(node);
    } else {                                  // older browsers
      node = ctx.createScriptProcessor(4096, 1, 1);
      node.onaudioprocess = (e) => onAudio(e.inputBuffer.getChannelData(0));
      source.connect(node);
      node.connect(ctx.destination);
    }
  }

  function stopAudio() {
    ready = false;
    pending = []; pendingLen = 0;
    if (source) source.disconnect();
    if (node) node.disconnect();
    if (stream) stream.getTracks().forEach((t) => t.stop());
    if (ctx) ctx.close();
    source = node = stream = ctx = null;
    $('start').disabled = false; $('stop').disabled = true;
  }

  async function start() {
    $('start').disabled = true; $('stop').disabled = false;
    setStatus('connecting');
    const proto = location.protocol === 'https:' ? 'wss://' : 'ws://';
    ws = new WebSocket(proto + location.host + '/');
    ws.binaryType = 'arraybuffer';
    ws.onmessage = onMessage;
    ws.onclose = () => { setStatus('disconnected'); stopAudio(); };
    ws.onerror = () => setStatus('connection error');
    ws.onopen = async () => {
      try {
        await startAudio();
      } catch (e) {
        setStatus('microphone error: ' + e);
        ws.close();
        return;
      }
      ws.send(JSON.stringify({ signal: 'start', nbest: 1,
                               continuous_decoding: $('continuous').checked }));
    };
  }

  function stop() {
    flush(true);
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ signal: 'end' }));
    stopAudio();
    setStatus('finishing');
  }

  $('start').onclick = start;
  $('stop').onclick = stop;
  if (new URLSearchParams(location.search).get('autostart') === '1') start();
})();
