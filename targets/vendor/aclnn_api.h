// DECLARATIONS WRITTEN BY QWEN3C, NOT VENDOR HEADERS.
//
// The aclnn operator API that ascend_device.h calls, declared from Huawei's public CANN
// documentation (aclnn two-phase interface: <Op>GetWorkspaceSize, then <Op>). The CANN headers
// that declare these (aclnn/acl_meta.h, aclnnop/aclnn_*.h) are not in the torch-npu wheel,
// which ships only the ACL runtime (acl/) and HCCL headers; those real headers are used for
// everything else. Only what qwen3c calls is declared. Checked by compiling, never linked or
// run against CANN.
#ifndef QWEN3C_ACLNN_API_H_
#define QWEN3C_ACLNN_API_H_

#include <acl/acl.h>

#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct aclTensor aclTensor;
typedef struct aclOpExecutor aclOpExecutor;
typedef int32_t aclnnStatus;

// A tensor view over device memory: view dims/strides in elements, offset in elements from
// tensorData, the storage's own dims.
aclTensor* aclCreateTensor(const int64_t* viewDims, uint64_t viewDimsNum, aclDataType dataType,
                           const int64_t* stride, int64_t offset, aclFormat format,
                           const int64_t* storageDims, uint64_t storageDimsNum, void* tensorData);
aclnnStatus aclDestroyTensor(const aclTensor* tensor);

aclnnStatus aclnnMatmulGetWorkspaceSize(const aclTensor* self, const aclTensor* mat2,
                                        aclTensor* out, int8_t cubeMathType,
                                        uint64_t* workspaceSize, aclOpExecutor** executor);
aclnnStatus aclnnMatmul(void* workspace, uint64_t workspaceSize, aclOpExecutor* executor,
                        aclrtStream stream);

aclnnStatus aclnnRmsNormGetWorkspaceSize(const aclTensor* x, const aclTensor* gamma,
                                         double epsilon, const aclTensor* yOut,
                                         const aclTensor* rstdOut, uint64_t* workspaceSize,
                                         aclOpExecutor** executor);
aclnnStatus aclnnRmsNorm(void* workspace, uint64_t workspaceSize, aclOpExecutor* executor,
                         aclrtStream stream);

// out = swish(x[..., :n/2]) * x[..., n/2:] along dim.
aclnnStatus aclnnSwiGluGetWorkspaceSize(const aclTensor* x, int64_t dim, const aclTensor* out,
                                        uint64_t* workspaceSize, aclOpExecutor** executor);
aclnnStatus aclnnSwiGlu(void* workspace, uint64_t workspaceSize, aclOpExecutor* executor,
                        aclrtStream stream);

aclnnStatus aclnnSoftmaxGetWorkspaceSize(const aclTensor* self, int64_t dim, aclTensor* out,
                                         uint64_t* workspaceSize, aclOpExecutor** executor);
aclnnStatus aclnnSoftmax(void* workspace, uint64_t workspaceSize, aclOpExecutor* executor,
                         aclrtStream stream);

#ifdef __cplusplus
}
#endif

#endif  // QWEN3C_ACLNN_API_H_
