// qwen3c's device interface (qwen3c_partitions.h) on Cambricon MLU: CNRT for memory and queues,
// CNNL operators for the compute. With the Neuware SDK (QWEN3C_NEUWARE defined by the build)
// the real cnrt.h / cnnl.h are used, otherwise qwen3c's own declarations (cambricon_api.h).
#ifndef QWEN3C_MLU_DEVICE_H_
#define QWEN3C_MLU_DEVICE_H_

#ifdef QWEN3C_NEUWARE
#include <cnnl.h>
#include <cnrt.h>
#else
#include "cambricon_api.h"
#endif

#include <memory>
#include <vector>

#include "qwen3c_partitions.h"

namespace qwen3c {

inline void CnrtCheck(cnrtRet_t status, const char* what) {
  if (status != cnrtSuccess) {
    TVM_FFI_THROW(RuntimeError) << "MLU: " << what << " failed: " << cnrtGetErrorStr(status);
  }
}

inline void CnnlCheck(cnnlStatus_t status, const char* what) {
  if (status != CNNL_STATUS_SUCCESS) {
    TVM_FFI_THROW(RuntimeError) << "MLU: " << what << " failed: "
                                << cnnlGetErrorString(status);
  }
}

class MluDevice {
 public:
  // Device memory, freed with the last reference.
  using Buffer = std::shared_ptr<void>;

  MluDevice() {
    CnrtCheck(cnrtSetDevice(0), "cnrtSetDevice");
    CnrtCheck(cnrtQueueCreate(&queue_), "cnrtQueueCreate");
    CnnlCheck(cnnlCreate(&handle_), "cnnlCreate");
    CnnlCheck(cnnlSetQueue(handle_, queue_), "cnnlSetQueue");
  }

  Buffer Alloc(size_t bytes) {
    void* data = nullptr;
    CnrtCheck(cnrtMalloc(&data, bytes == 0 ? 1 : bytes), "cnrtMalloc");
    return Buffer(data, [](void* p) { cnrtFree(p); });
  }

  void Upload(const void* host, size_t bytes, Buffer& device) {
    CnrtCheck(cnrtMemcpy(device.get(), const_cast<void*>(host), bytes, cnrtMemcpyHostToDev),
              "cnrtMemcpy to device");
  }

  void Download(const Buffer& device, void* host, size_t bytes) {
    CnrtCheck(cnrtQueueSync(queue_), "cnrtQueueSync");
    CnrtCheck(cnrtMemcpy(host, device.get(), bytes, cnrtMemcpyDevToHost), "cnrtMemcpy to host");
  }

  void Gemm(const Buffer& x, int64_t rows, int64_t k, DLDataType x_dtype, const Buffer& w,
            int64_t w_offset, int64_t n, DLDataType w_dtype, const Buffer& y) {
    Descriptor a({rows, k}, x_dtype), b({n, k}, w_dtype), c({rows, n}, kFloat32);
    const float one = 1.0f, zero = 0.0f;
    const char* weight = static_cast<const char*>(w.get()) + w_offset * ElementBytes(w_dtype);
    CnnlCheck(cnnlMatMul(handle_, false, true, &one, a.get(), x.get(), b.get(), weight, &zero,
                         c.get(), y.get()),
              "cnnlMatMul");
  }

  void RmsNorm(const Buffer& x, int64_t rows, int64_t d, const Buffer& w, double eps,
               DLDataType dtype, const Buffer& y) {
    Descriptor in({rows, d}, dtype), gamma({d}, dtype), out({rows, d}, dtype);
    cnnlFuseNormDescriptor_t norm = nullptr;
    CnnlCheck(cnnlCreateFuseNormDescriptor(&norm), "cnnlCreateFuseNormDescriptor");
    std::unique_ptr<cnnlFuseNormStruct, cnnlStatus_t (*)(cnnlFuseNormDescriptor_t)> owned(
        norm, cnnlDestroyFuseNormDescriptor);
    CnnlCheck(cnnlSetFuseNormDescriptor(norm, static_cast<float>(eps), 1.0f, true, false, false,
                                        false, false, CNNL_DTYPE_FLOAT,
                                        CNNL_TRANSFORMER_RMSNORM),
              "cnnlSetFuseNormDescriptor");
    size_t size = 0;
    CnnlCheck(cnnlGetFuseNormWorkspaceSize(handle_, norm, in.get(), &size),
              "cnnlGetFuseNormWorkspaceSize");
    Buffer workspace = Alloc(size);
    CnnlCheck(cnnlFuseNorm(handle_, norm, in.get(), x.get(), gamma.get(), w.get(), nullptr,
                           nullptr, nullptr, nullptr, nullptr, nullptr, workspace.get(), size,
                           out.get(), y.get(), nullptr, nullptr),
              "cnnlFuseNorm");
  }

  // y = silu(x[:, :i]) * x[:, i:]: SiLU of the gate half into y, then y *= the up half.
  void SwiGlu(const Buffer& x, int64_t rows, int64_t i, DLDataType dtype, const Buffer& y) {
    Descriptor gate({rows, i}, dtype, {2 * i, 1}), out({rows, i}, dtype);
    const char* up = static_cast<const char*>(x.get()) + i * ElementBytes(dtype);
    const float one = 1.0f, zero = 0.0f;
    cnnlActivationDescriptor_t silu = nullptr;
    CnnlCheck(cnnlCreateActivationDescriptor(&silu), "cnnlCreateActivationDescriptor");
    std::unique_ptr<cnnlActivationStruct, cnnlStatus_t (*)(cnnlActivationDescriptor_t)> owned(
        silu, cnnlDestroyActivationDescriptor);
    CnnlCheck(cnnlSetActivationDescriptor(silu, CNNL_ACTIVATION_SILU, CNNL_NOT_PROPAGATE_NAN,
                                          1.0f),
              "cnnlSetActivationDescriptor");
    CnnlCheck(cnnlActivationForward(handle_, silu, &one, gate.get(), x.get(), &zero, out.get(),
                                    y.get()),
              "cnnlActivationForward");
    cnnlOpTensorDescriptor_t mul = nullptr;
    CnnlCheck(cnnlCreateOpTensorDescriptor(&mul), "cnnlCreateOpTensorDescriptor");
    std::unique_ptr<cnnlOpTensorStruct, cnnlStatus_t (*)(cnnlOpTensorDescriptor_t)> owned_mul(
        mul, cnnlDestroyOpTensorDescriptor);
    CnnlCheck(cnnlSetOpTensorDescriptor(mul, CNNL_OP_TENSOR_MUL, CNNL_DTYPE_FLOAT,
                                        CNNL_NOT_PROPAGATE_NAN),
              "cnnlSetOpTensorDescriptor");
    size_t size = 0;
    CnnlCheck(cnnlGetOpTensorWorkspaceSize(handle_, out.get(), gate.get(), out.get(), &size),
              "cnnlGetOpTensorWorkspaceSize");
    Buffer workspace = Alloc(size);
    CnnlCheck(cnnlOpTensor(handle_, mul, &one, out.get(), y.get(), &one, gate.get(), up,
                           workspace.get(), size, &zero, out.get(), y.get()),
              "cnnlOpTensor");
  }

  void Softmax(const Buffer& x, int64_t rows, int64_t e, const Buffer& y) {
    Descriptor in({rows, e}, kFloat32), out({rows, e}, kFloat32);
    const float one = 1.0f, zero = 0.0f;
    CnnlCheck(cnnlSoftmaxForward(handle_, CNNL_SOFTMAX_ACCURATE,
                                 CNNL_SOFTMAX_MODE_LOW_DIMENSION, &one, in.get(), x.get(), &zero,
                                 out.get(), y.get()),
              "cnnlSoftmaxForward");
  }

 private:
  // A tensor descriptor (row-major unless strides are given), destroyed with this object.
  class Descriptor {
   public:
    Descriptor(std::vector<int64_t> dims, DLDataType dtype, std::vector<int64_t> strides = {}) {
      if (strides.empty()) {
        strides.assign(dims.size(), 1);
        for (size_t i = dims.size(); i-- > 1;) strides[i - 1] = strides[i] * dims[i];
      }
      std::vector<int> size(dims.begin(), dims.end()), stride(strides.begin(), strides.end());
      CnnlCheck(cnnlCreateTensorDescriptor(&desc_), "cnnlCreateTensorDescriptor");
      CnnlCheck(cnnlSetTensorDescriptorEx(desc_, CNNL_LAYOUT_ARRAY, CnnlType(dtype),
                                          static_cast<int>(size.size()), size.data(),
                                          stride.data()),
                "cnnlSetTensorDescriptorEx");
    }
    ~Descriptor() { cnnlDestroyTensorDescriptor(desc_); }
    Descriptor(const Descriptor&) = delete;
    Descriptor& operator=(const Descriptor&) = delete;
    cnnlTensorDescriptor_t get() const { return desc_; }

   private:
    cnnlTensorDescriptor_t desc_ = nullptr;
  };

  static cnnlDataType_t CnnlType(DLDataType dtype) {
    if (dtype.code == kDLFloat && dtype.bits == 32) return CNNL_DTYPE_FLOAT;
    if (dtype.code == kDLFloat && dtype.bits == 16) return CNNL_DTYPE_HALF;
    if (dtype.code == kDLBfloat && dtype.bits == 16) return CNNL_DTYPE_BFLOAT16;
    if (dtype.code == kDLInt && dtype.bits == 32) return CNNL_DTYPE_INT32;
    TVM_FFI_THROW(TypeError) << "MLU: no CNNL type for this dtype";
  }

  cnrtQueue_t queue_ = nullptr;
  cnnlHandle_t handle_ = nullptr;
};

}  // namespace qwen3c

#endif  // QWEN3C_MLU_DEVICE_H_
