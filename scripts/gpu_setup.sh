# Source this on a GPU machine before the GPU suites: `source scripts/gpu_setup.sh`.
# Installs fusionpasses (editable, no dependency downloads) and, on offline machines, the wheels
# found in ./.whl (e.g. flashinfer-python, apache-tvm-ffi, nvidia-cudnn-frontend) into /tmp/site.
# Keeps NVLink multicast off: the fused ops need only peer copies, and shared hosts forbid multicast.
export TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NCCL_NVLS_ENABLE=0 NVSHMEM_DISABLE_NVLS=1 FLASHINFER_NO_DOWNLOAD=1
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import fusionpasses.kernels" 2>/dev/null \
  || python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
python3 -c "import torch, fusionpasses; print('torch', torch.__version__, '| GPUs', torch.cuda.device_count(), '|', torch.cuda.get_device_name())"
