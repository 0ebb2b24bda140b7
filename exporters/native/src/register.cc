// Entry points of libedgecompress_ops.so: SessionOptions.register_custom_ops_library() calls
// RegisterCustomOps; EdgeCompressOpsApiVersion and EdgeCompressOpsIsa can be read through ctypes.
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#include "kernels.h"
#include "ort_glue.h"

EC_EXPORT int EdgeCompressOpsApiVersion(void) { return ORT_API_VERSION; }

// The instruction set whose kernels this CPU runs ("avx512", "avx2", "sse2" or "neon").
EC_EXPORT const char* EdgeCompressOpsIsa(void) { return ec::kernels().isa; }

EC_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(ORT_API_VERSION);
  if (api == nullptr) {
    // An older runtime: find the newest version it offers (every runtime offers 1) to say why we cannot run.
    uint32_t offered = ORT_API_VERSION - 1;
    while (offered > 1 && api_base->GetApi(offered) == nullptr) {
      --offered;
    }
    const std::string message = "libedgecompress_ops.so was built for ONNX Runtime API " +
                                std::to_string(ORT_API_VERSION) + "; this onnxruntime " +
                                api_base->GetVersionString() + " offers up to " + std::to_string(offered) +
                                "; rebuild with `edge-compress build-ops`";
    return api_base->GetApi(1)->CreateStatus(ORT_FAIL, message.c_str());
  }
  ec::g_api = api;
  const char* requested = std::getenv("EDGE_COMPRESS_KERNELS");
  std::string why;
  if (requested != nullptr && *requested != '\0' && ec::named_kernels(requested, &why) == nullptr) {
    const std::string message = std::string("EDGE_COMPRESS_KERNELS=") + requested + ": " + why;
    return api->CreateStatus(ORT_INVALID_ARGUMENT, message.c_str());
  }
  // ORT keeps pointers to the domain in the session options and every session made from them, and may
  // unload this library only after those are gone; the domains are therefore kept for the process.
  static std::mutex mu;
  static std::vector<OrtCustomOpDomain*> domains;
  OrtCustomOpDomain* domain = nullptr;
  EC_RETURN_IF_ERROR(api->CreateCustomOpDomain(ec::kDomain, &domain));
  OrtStatus* status = api->CustomOpDomain_Add(domain, ec::windowed_attention_op());
  if (status == nullptr) {
    status = api->CustomOpDomain_Add(domain, ec::block_sparse_attention_op());
  }
  if (status == nullptr) {
    status = api->CustomOpDomain_Add(domain, ec::lsh_attention_op());
  }
  if (status == nullptr) {
    status = api->AddCustomOpDomain(options, domain);
  }
  if (status != nullptr) {
    api->ReleaseCustomOpDomain(domain);
    return status;
  }
  std::lock_guard<std::mutex> lock(mu);
  domains.push_back(domain);
  return nullptr;
}
