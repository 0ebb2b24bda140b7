// ai.edgecompress::BlockSparseAttention (opset 1): BigBird-style block-sparse attention (Zaheer et al. 2020).
//
// S is cut into nb = S / block_size blocks; query block bi sees key block bj iff layout[nb - 1][bi][bj]
// (layout: (T, N, N) bool or uint8, one (N, N) pattern per block count), and only real keys. Work is
// O(S · block_size · blocks per row), never S x S. Rows with no allowed key give 0.
#include <algorithm>
#include <iterator>
#include <new>

#include "kernels.h"
#include "ort_glue.h"

namespace ec {
namespace {

constexpr const char* kOp = "BlockSparseAttention";

struct BlockSparseKernel {
  int64_t block_size;
};

OrtStatusPtr compute(void* kernel, OrtKernelContext* ctx) {
  const int64_t block_size = static_cast<const BlockSparseKernel*>(kernel)->block_size;
  Input q, k, v, key_mask, layout;
  EC_RETURN_IF_ERROR(read_input(ctx, 0, &q));
  EC_RETURN_IF_ERROR(read_input(ctx, 1, &k));
  EC_RETURN_IF_ERROR(read_input(ctx, 2, &v));
  EC_RETURN_IF_ERROR(read_input(ctx, 3, &key_mask));
  EC_RETURN_IF_ERROR(read_input(ctx, 4, &layout));
  int64_t dims[4];
  EC_RETURN_IF_ERROR(check_qkv(kOp, q, k, v, dims));
  const int64_t batch = dims[0], heads = dims[1], s = dims[2], d = dims[3];
  EC_RETURN_IF_ERROR(check_mask(kOp, "key_padding_mask", key_mask, batch, s));
  if (!layout.present()) {
    return invalid(std::string(kOp) + ": input 'layout' (T, N, N) bool is required");
  }
  if (layout.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL && layout.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8) {
    return invalid(std::string(kOp) + ": layout must be bool or uint8, got ONNX element type " +
                   std::to_string(static_cast<int>(layout.type)));
  }
  if (layout.dims.size() != 3) {
    return invalid(std::string(kOp) + ": layout must be 3-D (T, N, N), got shape " + shape_str(layout.dims));
  }
  if (s % block_size != 0) {
    return invalid(std::string(kOp) + ": sequence length S = " + std::to_string(s) +
                   " is not a multiple of block_size = " + std::to_string(block_size) +
                   "; pad the sequence to a multiple of the block size");
  }
  const int64_t blocks = s / block_size;
  if (blocks > layout.dims[0] || blocks > layout.dims[1] || blocks > layout.dims[2]) {
    return invalid(std::string(kOp) + ": S = " + std::to_string(s) + " makes nb = S / block_size = " +
                   std::to_string(blocks) + " blocks, but layout " + shape_str(layout.dims) +
                   " covers at most T = " + std::to_string(layout.dims[0]) + " blocks of N = " +
                   std::to_string(std::min(layout.dims[1], layout.dims[2])) + " (export with a longer layout)");
  }
  float* y = nullptr;
  EC_RETURN_IF_ERROR(make_output(ctx, {batch, heads, s, d}, &y));
  if (batch * heads * s * d == 0) {
    return nullptr;
  }

  BlockSparse w;
  w.q = static_cast<const float*>(q.data);
  w.k = static_cast<const float*>(k.data);
  w.v = static_cast<const float*>(v.data);
  w.y = y;
  w.heads = heads;
  w.s = s;
  w.d = d;
  w.block_size = block_size;
  w.blocks = blocks;
  w.pieces = (block_size + kRows - 1) / kRows;
  try {
    const auto* real = static_cast<const uint8_t*>(key_mask.data);
    const int64_t n1 = layout.dims[1], n2 = layout.dims[2];
    const auto* pattern = static_cast<const uint8_t*>(layout.data) + (blocks - 1) * n1 * n2;  // (N, N)
    w.keys.resize(batch * blocks);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t bi = 0; bi < blocks; ++bi) {
        std::vector<int32_t>& keys = w.keys[b * blocks + bi];
        for (int64_t bj = 0; bj < blocks; ++bj) {
          if (pattern[bi * n2 + bj] == 0) {
            continue;
          }
          for (int64_t j = bj * block_size; j < (bj + 1) * block_size; ++j) {
            if (real == nullptr || real[b * s + j] != 0) {
              keys.push_back(static_cast<int32_t>(j));
            }
          }
        }
      }
    }
    w.kt = aligned_floats(w.kt_storage, batch * heads * d * transposed_stride(s));
  } catch (const std::bad_alloc&) {
    return g_api->CreateStatus(ORT_FAIL, "BlockSparseAttention: out of memory for the key lists");
  }
  const Kernels& run = kernels();
  EC_RETURN_IF_ERROR(parallel_for(ctx, static_cast<size_t>(batch * heads), [&w, &run](size_t bh) {
    run.transpose(w.k + bh * w.s * w.d, w.s, w.d, w.kt + bh * w.d * transposed_stride(w.s));
  }));
  return parallel_for(ctx, static_cast<size_t>(batch * heads * blocks * w.pieces),
                      [&w, &run](size_t item) { run.block_sparse(w, static_cast<int64_t>(item)); });
}

OrtStatusPtr create(const OrtKernelInfo* info, void** kernel) {
  int64_t block_size = 0;
  EC_RETURN_IF_ERROR(int_attribute(info, kOp, "block_size", true, 0, &block_size));
  if (block_size <= 0) {
    return invalid(std::string(kOp) + ": attribute 'block_size' must be > 0, got " + std::to_string(block_size));
  }
  *kernel = new (std::nothrow) BlockSparseKernel{block_size};
  return *kernel == nullptr ? g_api->CreateStatus(ORT_FAIL, "BlockSparseAttention: out of memory") : nullptr;
}

void destroy(void* kernel) { delete static_cast<BlockSparseKernel*>(kernel); }

}  // namespace

const OrtCustomOp* block_sparse_attention_op() {
  static OpDef def = [] {
    OpDef op{};
    op.name = kOp;
    op.n_inputs = 5;  // Q, K, V, key_padding_mask?, layout
    const ONNXTensorElementDataType f32 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    // layout: any type at registration, bool or uint8 checked at run time (ORT has no two-type constraint here)
    const ONNXTensorElementDataType types[] = {f32, f32, f32, ONNX_TENSOR_ELEMENT_DATA_TYPE_BOOL,
                                               ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED};
    const bool optional[] = {false, false, false, true, false};
    std::copy(std::begin(types), std::end(types), op.input_types);
    std::copy(std::begin(optional), std::end(optional), op.optional);
    init_op(&op, create, compute, destroy);
    return op;
  }();
  return &def.base;
}

}  // namespace ec
