// Says when the trainer's models leave the memory for ComfyUI's own, and how long loading them again took. The server
// broadcasts "flux_lora_trainer.memory" messages ({text, released_bytes | reload_seconds}) to every open tab
// (nodes/model_sharing.py); each shows as a toast, or in the console where the frontend has no toasts.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const EVENT = "flux_lora_trainer.memory";
const SHOWN_MS = 6000;

app.registerExtension({
  name: "FluxLoraTrainer.MemoryNotice",

  setup() {
    api.addEventListener(EVENT, ({ detail }) => {
      const toast = app.extensionManager?.toast;
      if (toast) toast.add({ severity: "info", summary: "Flux LoRA Trainer", detail: detail.text, life: SHOWN_MS });
      else console.info(`Flux LoRA Trainer: ${detail.text}`);
    });
  },
});
