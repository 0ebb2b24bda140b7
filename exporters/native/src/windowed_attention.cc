// ai.edgecompress::WindowedAttention (opset 1): sliding-window attention with global tokens
// (Longformer, Beltagy et al. 2020), banded: O(S·window + G·S) work and memory, never S x S.
//
// Query i may attend key j iff key j is real, j <= i when causal, and |i - j| <= window or j is global
// or i is global. A global position that is padding is not global. Rows with no allowed key give 0.
#include <algorithm>
#include <iterator>
#include <new>

#include "kernels.h"
#include "ort_glue.h"

namespace ec {
namespace {

constexpr const char* kOp = "WindowedAttention";

struct WindowedKernel {
  int64_t window;
  bool causal;
};

OrtStatusPtr compute(void* kernel, OrtKernelContext* ctx) {
  const auto* kern = static_cast<const WindowedKernel*>(kernel);
  Input q, k, v, key_mask, global_mask;
  EC_RETURN_IF_ERROR(read_input(ctx, 0, &q));
  EC_RETURN_IF_ERROR(read_input(ctx, 1, &k));
  EC_RETURN_IF_ERROR(read_input(ctx, 2, &v));
  EC_RETURN_IF_ERROR(read_input(ctx, 3, &key_mask));
  EC_RETURN_IF_ERROR(read_input(ctx, 4, &global_mask));
  int64_t dims[4];
  EC_RETURN_IF_ERROR(check_qkv(kOp, q, k, v, dims));
  const int64_t batch = dims[0], heads = dims[1], s = dims[2], d = dims[3];
  EC_RETURN_IF_ERROR(check_mask(kOp, "key_padding_mask", key_mask, batch, s));
  EC_RETURN_IF_ERROR(check_mask(kOp, "global_mask", global_mask, batch, s));
  float* y = nullptr;
  EC_RETURN_IF_ERROR(make_output(ctx, {batch, heads, s, d}, &y));
  if (batch * heads * s * d == 0) {
    return nullptr;
  }

  Windowed w;
  w.q = static_cast<const float*>(q.data);
  w.k = static_cast<const float*>(k.data);
  w.v = static_cast<const float*>(v.data);
  w.y = y;
  w.heads = heads;
  w.s = s;
  w.d = d;
  w.window = static_cast<int32_t>(std::min<int64_t>(kern->window, s));
  w.causal = kern->causal;
  w.rows_per_block = kern->window < kRows ? kRows / 2 : kRows;
  w.row_blocks = (s + w.rows_per_block - 1) / w.rows_per_block;
  try {
    const auto* real_in = static_cast<const uint8_t*>(key_mask.data);
    const auto* glob_in = static_cast<const uint8_t*>(global_mask.data);
    w.real.resize(batch * s);
    w.glob.resize(batch * s);
    w.real_prefix.resize(batch * (s + 1));
    w.globals.resize(batch);
    size_t most_globals = 0;
    for (int64_t b = 0; b < batch; ++b) {
      int32_t* prefix = w.real_prefix.data() + b * (s + 1);
      prefix[0] = 0;
      for (int64_t j = 0; j < s; ++j) {
        const int64_t at = b * s + j;
        const uint8_t real = real_in == nullptr || real_in[at] != 0;
        const uint8_t glob = glob_in != nullptr && glob_in[at] != 0 && real;
        w.real[at] = real;
        w.glob[at] = glob;
        prefix[j + 1] = prefix[j] + real;
        if (glob) {
          w.globals[b].push_back(static_cast<int32_t>(j));
        }
      }
      most_globals = std::max(most_globals, w.globals[b].size());
    }
    w.items_per_head = w.row_blocks + static_cast<int64_t>((most_globals + kRows - 1) / kRows);
    w.kt = aligned_floats(w.kt_storage, batch * heads * d * transposed_stride(s));
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "WindowedAttention: out of memory for the masks");
  }
  const Kernels& run = kernels();
  EC_RETURN_IF_ERROR(parallel_for(ctx, static_cast<size_t>(batch * heads), [&w, &run](size_t bh) {
    run.transpose(w.k + bh * w.s * w.d, w.s, w.d, w.kt + bh * w.d * transposed_stride(w.s));
  }));
  return parallel_for(ctx, static_cast<size_t>(batch * heads * w.items_per_head),
                      [&w, &run](size_t item) { run.windowed(w, static_cast<int64_t>(item)); });
}

OrtStatusPtr create(const OrtKernelInfo* info, void** kernel) {
  int64_t window = 0;
  int64_t causal = 0;
  EC_RETURN_IF_ERROR(int_attribute(info, kOp, "window", true, 0, &window));
  EC_RETURN_IF_ERROR(int_attribute(info, kOp, "causal", false, 0, &causal));
  if (window <= 0) {
    return invalid(std::string(kOp) + ": attribute 'window' (the half-width of the band) must be > 0, got " +
                   std::to_string(window));
  }
  if (causal != 0 && causal != 1) {
    return invalid(std::string(kOp) + ": attribute 'causal' must be 0 or 1, got " + std::to_string(causal));
  }
  *kernel = new (std::nothrow) WindowedKernel{window, causal == 1};
  return *kernel == nullptr ? g_api->CreateStatus(ORT_FAIL, "WindowedAttention: out of memory") : nullptr;
}

void destroy(void* kernel) { delete static_cast<WindowedKernel*>(kernel); }

}  // namespace

const OrtCustomOp* windowed_attention_op() {
  static OpDef def = [] {
    OpDef op{};
    op.name = kOp;
    op.n_inputs = 5;  // Q, K, V, key_padding_mask?, global_mask?
    const ONNXTensorElementDataType f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    const ONNXTensorElementDataType boolean = ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL;
    const ONNXTensorElementDataType types[] = {f32, f32, f32, boolean, boolean};
    const bool optional[] = {false, false, false, true, true};
    std::copy(std::begin(types), std::end(types), op.input_types);
    std::copy(std::begin(optional), std::end(optional), op.optional);
    init_op(&op, create, compute, destroy);
    return op;
  }();
  return &def.base;
}

}  // namespace ec
