// AudioWorklet processor: forwards the microphone's mono float samples to the page.
class PcmForwarder extends AudioWorkletProcessor {
  process(inputs) {
    const input = inputs[0];
    if (input && input.length > 0) {
      this.port.postMessage(input[0].slice(0));
    }
    return true;
  }
}
registerProcessor('pcm-forwarder', PcmForwarder);
