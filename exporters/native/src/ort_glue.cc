#include "ort_glue.h"

namespace ec {

const OrtApi* g_api = nullptr;

OrtStatus* invalid(const std::string& message) {
  return g_api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str());
}

int64_t Input::numel() const {
  int64_t n = 1;
  for (int64_t d : dims) {
    n *= d;
  }
  return n;
}

std::string shape_str(const std::vector<int64_t>& dims) {
  std::string out = "(";
  for (size_t i = 0; i < dims.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(dims[i]);
  }
  return out + (dims.size() == 1 ? ",)" : ")");
}

OrtStatus* read_input(OrtKernelContext* ctx, size_t index, Input* out) {
  *out = Input{};
  size_t count = 0;
  EC_RETURN_IF_ERROR(g_api->KernelContext_GetInputCount(ctx, &count));
  if (index >= count) {
    return nullptr;  // an optional input left off the end of the node's input list
  }
  const OrtValue* value = nullptr;
  EC_RETURN_IF_ERROR(g_api->KernelContext_GetInput(ctx, index, &value));
  if (value == nullptr) {
    return nullptr;  // an optional input given as ""
  }
  OrtTensorTypeAndShapeInfo* info = nullptr;
  EC_RETURN_IF_ERROR(g_api->GetTensorTypeAndShape(value, &info));
  size_t rank = 0;
  OrtStatus* status = g_api->GetTensorElementType(info, &out->type);
  if (status == nullptr) {
    status = g_api->GetDimensionsCount(info, &rank);
  }
  if (status == nullptr) {
    out->dims.resize(rank);
    status = g_api->GetDimensions(info, out->dims.data(), rank);
  }
  g_api->ReleaseTensorTypeAndShapeInfo(info);
  EC_RETURN_IF_ERROR(status);
  void* data = nullptr;
  // The C API has no const accessor in every version we support; the data is only read.
  EC_RETURN_IF_ERROR(g_api->GetTensorMutableData(const_cast<OrtValue*>(value), &data));
  out->value = value;
  out->data = data;
  return nullptr;
}

OrtStatus* make_output(OrtKernelContext* ctx, const std::vector<int64_t>& dims, float** data) {
  OrtValue* value = nullptr;
  EC_RETURN_IF_ERROR(g_api->KernelContext_GetOutput(ctx, 0, dims.data(), dims.size(), &value));
  void* raw = nullptr;
  EC_RETURN_IF_ERROR(g_api->GetTensorMutableData(value, &raw));
  *data = static_cast<float*>(raw);
  return nullptr;
}

OrtStatus* int_attribute(const OrtKernelInfo* info, const char* op, const char* name, bool required,
                         int64_t fallback, int64_t* out) {
  OrtStatus* status = g_api->KernelInfoGetAttribute_int64(info, name, out);
  if (status == nullptr) {
    return nullptr;
  }
  g_api->ReleaseStatus(status);
  if (required) {
    return invalid(std::string(op) + ": the int attribute '" + name + "' is required");
  }
  *out = fallback;
  return nullptr;
}

OrtStatus* check_qkv(const char* op, const Input& q, const Input& k, const Input& v, int64_t dims[4]) {
  if (q.dims.size() != 4) {
    return invalid(std::string(op) + ": Q must be 4-D (B, H, S, D), got shape " + shape_str(q.dims));
  }
  if (k.dims != q.dims || v.dims != q.dims) {
    return invalid(std::string(op) + ": Q, K and V must have the same shape (B, H, S, D); got Q " +
                   shape_str(q.dims) + ", K " + shape_str(k.dims) + ", V " + shape_str(v.dims));
  }
  if (q.dims[2] > INT32_MAX) {
    return invalid(std::string(op) + ": sequence length " + std::to_string(q.dims[2]) + " is too long");
  }
  for (int i = 0; i < 4; ++i) {
    dims[i] = q.dims[i];
  }
  return nullptr;
}

OrtStatus* check_mask(const char* op, const char* what, const Input& mask, int64_t b, int64_t s) {
  if (!mask.present()) {
    return nullptr;
  }
  if (mask.dims.size() != 2 || mask.dims[0] != b || mask.dims[1] != s) {
    return invalid(std::string(op) + ": " + what + " must have shape (B, S) = " + shape_str({b, s}) +
                   " to match Q, got " + shape_str(mask.dims));
  }
  return nullptr;
}

namespace {

const OpDef* def_of(const OrtCustomOp* op) { return reinterpret_cast<const OpDef*>(op); }

const char* ORT_API_CALL get_name(const OrtCustomOp* op) { return def_of(op)->name; }
const char* ORT_API_CALL get_provider(const OrtCustomOp*) { return nullptr; }  // CPU
ONNXTensorElementDataType ORT_API_CALL get_input_type(const OrtCustomOp* op, size_t i) {
  return def_of(op)->input_types[i];
}
size_t ORT_API_CALL get_input_count(const OrtCustomOp* op) { return def_of(op)->n_inputs; }
ONNXTensorElementDataType ORT_API_CALL get_output_type(const OrtCustomOp*, size_t) {
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
size_t ORT_API_CALL get_output_count(const OrtCustomOp*) { return 1; }
OrtCustomOpInputOutputCharacteristic ORT_API_CALL get_input_characteristic(const OrtCustomOp* op, size_t i) {
  return def_of(op)->optional[i] ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
OrtCustomOpInputOutputCharacteristic ORT_API_CALL get_output_characteristic(const OrtCustomOp*, size_t) {
  return INPUT_OUTPUT_REQUIRED;
}
OrtMemType ORT_API_CALL get_input_memory_type(const OrtCustomOp*, size_t) { return OrtMemTypeDefault; }
int ORT_API_CALL one(const OrtCustomOp*) { return 1; }

OrtStatusPtr ORT_API_CALL create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo* info,
                                        void** kernel) {
  *kernel = nullptr;
  return def_of(op)->create(info, kernel);
}

// Y has Q's type and shape.
OrtStatusPtr ORT_API_CALL infer_shape(const OrtCustomOp*, OrtShapeInferContext* ctx) {
  OrtTensorTypeAndShapeInfo* info = nullptr;  // owned by the context
  EC_RETURN_IF_ERROR(g_api->ShapeInferContext_GetInputTypeShape(ctx, 0, &info));
  return g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, info);
}

}  // namespace

void init_op(OpDef* def, OrtStatusPtr (*create)(const OrtKernelInfo*, void**),
             OrtStatusPtr (*compute)(void*, OrtKernelContext*), void (*destroy)(void*)) {
  def->create = create;
  OrtCustomOp& op = def->base;
  op = OrtCustomOp{};
  op.version = ORT_API_VERSION;
  op.GetName = get_name;
  op.GetExecutionProviderType = get_provider;
  op.GetInputType = get_input_type;
  op.GetInputTypeCount = get_input_count;
  op.GetOutputType = get_output_type;
  op.GetOutputTypeCount = get_output_count;
  op.KernelDestroy = destroy;
  op.GetInputCharacteristic = get_input_characteristic;
  op.GetOutputCharacteristic = get_output_characteristic;
  op.GetInputMemoryType = get_input_memory_type;
  op.GetVariadicInputMinArity = one;
  op.GetVariadicInputHomogeneity = one;
  op.GetVariadicOutputMinArity = one;
  op.GetVariadicOutputHomogeneity = one;
  // The V2 entry points return a status, so bad attributes and inputs become ORT errors, not crashes.
  op.CreateKernelV2 = create_kernel;
  op.KernelComputeV2 = compute;
  op.InferOutputShapeFn = infer_shape;
  op.GetStartVersion = one;  // opset version 1 of the domain, and every later one
}

}  // namespace ec
