// qwen3c's device interface (qwen3c_partitions.h) on Huawei Ascend: ACL runtime for memory and
// streams (real ACL headers), aclnn operators for the compute (aclnn_api.h).
#ifndef QWEN3C_ASCEND_DEVICE_H_
#define QWEN3C_ASCEND_DEVICE_H_

#include <acl/acl.h>

#include <memory>
#include <string>
#include <vector>

#include "aclnn_api.h"
#include "qwen3c_partitions.h"

namespace qwen3c {

inline void AclCheck(int status, const char* what) {
  if (status != ACL_SUCCESS) {
    const char* detail = aclGetRecentErrMsg();
    TVM_FFI_THROW(RuntimeError) << "Ascend: " << what << " failed (" << status << ")"
                                << (detail ? std::string(": ") + detail : std::string());
  }
}

class AscendDevice {
 public:
  // Device memory, freed with the last reference.
  using Buffer = std::shared_ptr<void>;

  AscendDevice() {
    AclCheck(aclInit(nullptr), "aclInit");
    AclCheck(aclrtSetDevice(0), "aclrtSetDevice");
    AclCheck(aclrtCreateStream(&stream_), "aclrtCreateStream");
  }

  Buffer Alloc(size_t bytes) {
    void* data = nullptr;
    AclCheck(aclrtMalloc(&data, bytes == 0 ? 1 : bytes, ACL_MEM_MALLOC_HUGE_FIRST),
             "aclrtMalloc");
    return Buffer(data, [](void* p) { aclrtFree(p); });
  }

  void Upload(const void* host, size_t bytes, Buffer& device) {
    AclCheck(aclrtMemcpy(device.get(), bytes, host, bytes, ACL_MEMCPY_HOST_TO_DEVICE),
             "aclrtMemcpy to device");
  }

  void Download(const Buffer& device, void* host, size_t bytes) {
    AclCheck(aclrtSynchronizeStream(stream_), "aclrtSynchronizeStream");
    AclCheck(aclrtMemcpy(host, bytes, device.get(), bytes, ACL_MEMCPY_DEVICE_TO_HOST),
             "aclrtMemcpy to host");
  }

  void Gemm(const Buffer& x, int64_t rows, int64_t k, DLDataType x_dtype, const Buffer& w,
            int64_t w_offset, int64_t n, DLDataType w_dtype, const Buffer& y) {
    Tensor2 a(x, {rows, k}, {k, 1}, 0, {rows * k}, x_dtype);
    // W[n, k] read as its transpose [k, n]: strides (1, k), no copy.
    Tensor2 b(w, {k, n}, {1, k}, w_offset, {w_offset + n * k}, w_dtype);
    Tensor2 c(y, {rows, n}, {n, 1}, 0, {rows * n}, kFloat32);
    Run("aclnnMatmul", [&](uint64_t* size, aclOpExecutor** exec) {
      return aclnnMatmulGetWorkspaceSize(a.get(), b.get(), c.get(), 0, size, exec);
    }, aclnnMatmul);
  }

  void RmsNorm(const Buffer& x, int64_t rows, int64_t d, const Buffer& w, double eps,
               DLDataType dtype, const Buffer& y) {
    Buffer rstd = Alloc(rows * sizeof(float));
    Tensor2 in(x, {rows, d}, {d, 1}, 0, {rows * d}, dtype);
    Tensor2 gamma(w, {d}, {1}, 0, {d}, dtype);
    Tensor2 out(y, {rows, d}, {d, 1}, 0, {rows * d}, dtype);
    Tensor2 inv(rstd, {rows, 1}, {1, 1}, 0, {rows}, kFloat32);
    Run("aclnnRmsNorm", [&](uint64_t* size, aclOpExecutor** exec) {
      return aclnnRmsNormGetWorkspaceSize(in.get(), gamma.get(), eps, out.get(), inv.get(), size,
                                          exec);
    }, aclnnRmsNorm);
  }

  void SwiGlu(const Buffer& x, int64_t rows, int64_t i, DLDataType dtype, const Buffer& y) {
    Tensor2 in(x, {rows, 2 * i}, {2 * i, 1}, 0, {rows * 2 * i}, dtype);
    Tensor2 out(y, {rows, i}, {i, 1}, 0, {rows * i}, dtype);
    Run("aclnnSwiGlu", [&](uint64_t* size, aclOpExecutor** exec) {
      return aclnnSwiGluGetWorkspaceSize(in.get(), -1, out.get(), size, exec);
    }, aclnnSwiGlu);
  }

  void Softmax(const Buffer& x, int64_t rows, int64_t e, const Buffer& y) {
    Tensor2 in(x, {rows, e}, {e, 1}, 0, {rows * e}, kFloat32);
    Tensor2 out(y, {rows, e}, {e, 1}, 0, {rows * e}, kFloat32);
    Run("aclnnSoftmax", [&](uint64_t* size, aclOpExecutor** exec) {
      return aclnnSoftmaxGetWorkspaceSize(in.get(), -1, out.get(), size, exec);
    }, aclnnSoftmax);
  }

 private:
  // An aclTensor view, destroyed with this object.
  class Tensor2 {
   public:
    Tensor2(const Buffer& data, std::vector<int64_t> dims, std::vector<int64_t> strides,
            int64_t offset, std::vector<int64_t> storage, DLDataType dtype)
        : tensor_(aclCreateTensor(dims.data(), dims.size(), AclType(dtype), strides.data(),
                                  offset, ACL_FORMAT_ND, storage.data(), storage.size(),
                                  data.get())) {
      if (tensor_ == nullptr) TVM_FFI_THROW(RuntimeError) << "Ascend: aclCreateTensor failed";
    }
    ~Tensor2() { aclDestroyTensor(tensor_); }
    Tensor2(const Tensor2&) = delete;
    Tensor2& operator=(const Tensor2&) = delete;
    aclTensor* get() const { return tensor_; }

   private:
    aclTensor* tensor_;
  };

  static aclDataType AclType(DLDataType dtype) {
    if (dtype.code == kDLFloat && dtype.bits == 32) return ACL_FLOAT;
    if (dtype.code == kDLFloat && dtype.bits == 16) return ACL_FLOAT16;
    if (dtype.code == kDLBfloat && dtype.bits == 16) return ACL_BF16;
    if (dtype.code == kDLInt && dtype.bits == 32) return ACL_INT32;
    TVM_FFI_THROW(TypeError) << "Ascend: no ACL type for this dtype";
  }

  // aclnn's two phases: size the workspace and plan, then launch on the stream.
  template <typename Plan, typename Launch>
  void Run(const char* name, Plan plan, Launch launch) {
    uint64_t workspace_size = 0;
    aclOpExecutor* executor = nullptr;
    AclCheck(plan(&workspace_size, &executor), name);
    Buffer workspace = workspace_size ? Alloc(workspace_size) : Buffer();
    AclCheck(launch(workspace.get(), workspace_size, executor, stream_), name);
  }

  aclrtStream stream_ = nullptr;
};

}  // namespace qwen3c

#endif  // QWEN3C_ASCEND_DEVICE_H_
