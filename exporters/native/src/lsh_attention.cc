// ai.edgecompress::LSHAttention (opset 1): Reformer's LSH attention (Kitaev et al. 2020) with the
// rotations given as an input. Work per (batch, head): R rounds of hashing O(S·D·K/2), a counting sort
// O(S + K) and chunked attention O(S·2·chunk·D); memory O(S·D), never S x S. See lsh_kernel.h.
#include <algorithm>
#include <iterator>
#include <new>
#include <vector>

#include "kernels.h"
#include "ort_glue.h"

namespace ec {
namespace {

constexpr const char* kOp = "LSHAttention";

struct LshKernel {
  int64_t chunk;
  bool causal;
};

OrtStatusPtr check_rotations(const Input& rot, int64_t d) {
  if (!rot.present() || rot.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
    return invalid(std::string(kOp) + ": input 'rotations' (R, D, K/2) float is required");
  }
  if (rot.dims.size() != 3 || rot.dims[1] != d || rot.dims[0] < 1 || rot.dims[2] < 1) {
    return invalid(std::string(kOp) + ": rotations must be (R, D = " + std::to_string(d) +
                   ", K/2) with R, K/2 >= 1, got shape " + shape_str(rot.dims));
  }
  return nullptr;
}

OrtStatusPtr compute(void* kernel, OrtKernelContext* ctx) {
  const auto* kern = static_cast<const LshKernel*>(kernel);
  Input qk, v, key_mask, rot;
  EC_RETURN_IF_ERROR(read_input(ctx, 0, &qk));
  EC_RETURN_IF_ERROR(read_input(ctx, 1, &v));
  EC_RETURN_IF_ERROR(read_input(ctx, 2, &key_mask));
  EC_RETURN_IF_ERROR(read_input(ctx, 3, &rot));
  int64_t dims[4];
  EC_RETURN_IF_ERROR(check_qkv(kOp, qk, qk, v, dims));
  const int64_t batch = dims[0], heads = dims[1], s = dims[2], d = dims[3];
  EC_RETURN_IF_ERROR(check_mask(kOp, "key_padding_mask", key_mask, batch, s));
  EC_RETURN_IF_ERROR(check_rotations(rot, d));
  if (s % kern->chunk != 0) {
    return invalid(std::string(kOp) + ": sequence length S = " + std::to_string(s) +
                   " is not a multiple of chunk = " + std::to_string(kern->chunk) +
                   "; pad the sequence to a multiple of the chunk");
  }
  if (s > (int64_t{1} << 30)) {
    return invalid(std::string(kOp) + ": sequence length S = " + std::to_string(s) + " is too long");
  }
  float* y = nullptr;
  EC_RETURN_IF_ERROR(make_output(ctx, {batch, heads, s, d}, &y));
  if (batch * heads * s * d == 0) {
    return nullptr;
  }
  Lsh job;
  job.qk = static_cast<const float*>(qk.data);
  job.v = static_cast<const float*>(v.data);
  job.y = y;
  job.rot = static_cast<const float*>(rot.data);
  job.real = static_cast<const uint8_t*>(key_mask.data);
  job.heads = heads;
  job.s = s;
  job.d = d;
  job.rounds = rot.dims[0];
  job.half = rot.dims[2];
  job.chunk = kern->chunk;
  job.causal = kern->causal;
  std::vector<int32_t> ints;
  std::vector<float> floats;
  try {
    ints.resize(batch * heads * lsh_ints(job));
    floats.resize(batch * heads * lsh_floats(job));
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "LSHAttention: out of memory for the sorted rows");
  }
  job.ints = ints.data();
  job.floats = floats.data();
  const Kernels& run = kernels();
  return parallel_for(ctx, static_cast<size_t>(batch * heads),
                      [&job, &run](size_t item) { run.lsh(job, static_cast<int64_t>(item)); });
}

OrtStatusPtr create(const OrtKernelInfo* info, void** kernel) {
  int64_t chunk = 0;
  int64_t causal = 0;
  EC_RETURN_IF_ERROR(int_attribute(info, kOp, "chunk", true, 0, &chunk));
  EC_RETURN_IF_ERROR(int_attribute(info, kOp, "causal", false, 0, &causal));
  if (chunk <= 0) {
    return invalid(std::string(kOp) + ": attribute 'chunk' must be > 0, got " + std::to_string(chunk));
  }
  if (causal != 0 && causal != 1) {
    return invalid(std::string(kOp) + ": attribute 'causal' must be 0 or 1, got " + std::to_string(causal));
  }
  *kernel = new (std::nothrow) LshKernel{chunk, causal == 1};
  return *kernel == nullptr ? g_api->CreateStatus(ORT_FAIL, "LSHAttention: out of memory") : nullptr;
}

void destroy(void* kernel) { delete static_cast<LshKernel*>(kernel); }

}  // namespace

const OrtCustomOp* lsh_attention_op() {
  static OpDef def = [] {
    OpDef op{};
    op.name = kOp;
    op.n_inputs = 4;  // QK, V, key_padding_mask?, rotations
    const ONNXTensorElementDataType f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const ONNXTensorElementDataType types[] = {f32, f32, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL, f32};
    const bool optional[] = {false, false, true, false};
    std::copy(std::begin(types), std::end(types), op.input_types);
    std::copy(std::begin(optional), std::end(optional), op.optional);
    init_op(&op, create, compute, destroy);
    return op;
  }();
  return &def.base;
}

}  // namespace ec
