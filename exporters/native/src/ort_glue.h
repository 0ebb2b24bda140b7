// Glue between the kernels and ONNX Runtime's custom-op C API (no link against libonnxruntime: the API
// table arrives through RegisterCustomOps).
#pragma once

#include <onnxruntime_c_api.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <mutex>
#include <string>
#include <vector>

#define EC_EXPORT extern "C" __attribute__((visibility("default")))

namespace ec {

constexpr const char* kDomain = "ai.edgecompress";

// The API table handed over by RegisterCustomOps (the version the headers were built for).
extern const OrtApi* g_api;

// A failed status with `message`, for ONNX Runtime to raise (Python: InvalidArgument / Fail).
OrtStatus* invalid(const std::string& message);

#define EC_RETURN_IF_ERROR(expr)     \
  do {                               \
    OrtStatus* ec_status_ = (expr);  \
    if (ec_status_ != nullptr) {     \
      return ec_status_;             \
    }                                \
  } while (0)

// One input of a kernel call; value == nullptr when an optional input is absent.
struct Input {
  const OrtValue* value = nullptr;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  std::vector<int64_t> dims;
  const void* data = nullptr;

  bool present() const { return value != nullptr; }
  int64_t numel() const;
};

OrtStatus* read_input(OrtKernelContext* ctx, size_t index, Input* out);
OrtStatus* make_output(OrtKernelContext* ctx, const std::vector<int64_t>& dims, float** data);
std::string shape_str(const std::vector<int64_t>& dims);

// Integer attribute: a missing required one is an error naming the op and the attribute.
OrtStatus* int_attribute(const OrtKernelInfo* info, const char* op, const char* name, bool required,
                         int64_t fallback, int64_t* out);

// Q, K, V all (B, H, S, D) float32; fills dims = {B, H, S, D}.
OrtStatus* check_qkv(const char* op, const Input& q, const Input& k, const Input& v, int64_t dims[4]);
// An optional (B, S) bool mask: returns an error naming `what` when its shape is not (B, S).
OrtStatus* check_mask(const char* op, const char* what, const Input& mask, int64_t b, int64_t s);

// The static description of one op; `base` comes first so ORT's OrtCustomOp* casts back to it.
struct OpDef {
  OrtCustomOp base;
  const char* name;
  size_t n_inputs;
  ONNXTensorElementDataType input_types[8];
  bool optional[8];
  OrtStatusPtr (*create)(const OrtKernelInfo* info, void** kernel);
};

// Fills the OrtCustomOp callbacks of `def` (its name and inputs already set); float32 output, CPU.
void init_op(OpDef* def, OrtStatusPtr (*create)(const OrtKernelInfo*, void**),
             OrtStatusPtr (*compute)(void*, OrtKernelContext*), void (*destroy)(void*));

// Runs fn(i) for i in [0, n) on ORT's intra-op thread pool (sequential with one thread). An exception in
// fn (std::bad_alloc) becomes a failed status instead of crossing into ONNX Runtime.
template <class Fn>
OrtStatus* parallel_for(OrtKernelContext* ctx, size_t n, const Fn& fn) {
  struct Job {
    const Fn* fn;
    std::atomic<bool> failed{false};
    std::mutex mu;
    std::string what;
  } job;
  job.fn = &fn;
  auto trampoline = [](void* data, size_t i) {
    Job* j = static_cast<Job*>(data);
    if (j->failed.load(std::memory_order_relaxed)) {
      return;
    }
    try {
      (*j->fn)(i);
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lock(j->mu);
      j->failed = true;
      j->what = e.what();
    } catch (...) {
      j->failed = true;
    }
  };
  if (n == 0) {
    return nullptr;
  }
  EC_RETURN_IF_ERROR(g_api->KernelContext_ParallelFor(ctx, trampoline, n, 0, &job));
  if (job.failed) {
    return g_api->CreateStatus(ORT_FAIL, ("edge-compress kernel failed: " + job.what).c_str());
  }
  return nullptr;
}

const OrtCustomOp* windowed_attention_op();
const OrtCustomOp* block_sparse_attention_op();
const OrtCustomOp* lsh_attention_op();

}  // namespace ec
