"""Setup shared by tests/ and runtime/tests/ (pytest loads this file for both)."""
import os

# the runtime takes the kernel graphs of MoE exports without timing them against the
# .onnx graphs (that choice depends on the CPU; test_rt_encoder_choice.py tests it)
os.environ["WENET_MOE_KERNEL_EXPERTS"] = "on"
