// DECLARATIONS WRITTEN BY QWEN3C, NOT VENDOR HEADERS.
//
// The few CNRT (runtime) and CNNL (operator library) functions, types and constants that
// mlu_device.h uses, declared from Cambricon's public developer documentation; no Cambricon
// headers can be obtained here. Enum values are the documented ones where the documentation
// gives them and otherwise placeholders: when NEUWARE_HOME is set, qwen3c compiles against the
// real cnrt.h / cnnl.h instead and this file is not used. Checked by compiling only; never
// linked or run against the Neuware SDK.
#ifndef QWEN3C_CAMBRICON_API_H_
#define QWEN3C_CAMBRICON_API_H_

#include <cstddef>
#include <cstdint>

#ifdef __cplusplus
extern "C" {
#endif

// ---- CNRT ----------------------------------------------------------------------------------
typedef enum { cnrtSuccess = 0 } cnrtRet_t;
typedef struct CNqueue_st* cnrtQueue_t;
typedef enum {
  cnrtMemcpyHostToDev = 0,
  cnrtMemcpyDevToDev = 1,
  cnrtMemcpyDevToHost = 2,
} cnrtMemTransDir_t;

cnrtRet_t cnrtSetDevice(int device);
cnrtRet_t cnrtQueueCreate(cnrtQueue_t* queue);
cnrtRet_t cnrtQueueSync(cnrtQueue_t queue);
cnrtRet_t cnrtMalloc(void** ptr, size_t bytes);
cnrtRet_t cnrtFree(void* ptr);
cnrtRet_t cnrtMemcpy(void* dst, void* src, size_t bytes, cnrtMemTransDir_t direction);
const char* cnrtGetErrorStr(cnrtRet_t error);

// ---- CNNL ----------------------------------------------------------------------------------
typedef enum { CNNL_STATUS_SUCCESS = 0 } cnnlStatus_t;
typedef struct cnnlContext* cnnlHandle_t;
typedef struct cnnlTensorStruct* cnnlTensorDescriptor_t;
typedef struct cnnlActivationStruct* cnnlActivationDescriptor_t;
typedef struct cnnlOpTensorStruct* cnnlOpTensorDescriptor_t;
typedef struct cnnlFuseNormStruct* cnnlFuseNormDescriptor_t;

typedef enum { CNNL_LAYOUT_ARRAY = 2 } cnnlTensorLayout_t;
typedef enum {
  CNNL_DTYPE_HALF = 1,
  CNNL_DTYPE_FLOAT = 2,
  CNNL_DTYPE_INT32 = 4,
  CNNL_DTYPE_BFLOAT16 = 15,
} cnnlDataType_t;
typedef enum { CNNL_NOT_PROPAGATE_NAN = 0 } cnnlNanPropagation_t;
typedef enum { CNNL_ACTIVATION_SILU = 20 } cnnlActivationMode_t;
typedef enum { CNNL_OP_TENSOR_MUL = 2 } cnnlOpTensorDesc_t;
typedef enum { CNNL_SOFTMAX_ACCURATE = 1 } cnnlSoftmaxAlgorithm_t;
typedef enum { CNNL_SOFTMAX_MODE_LOW_DIMENSION = 2 } cnnlSoftmaxMode_t;
typedef enum { CNNL_TRANSFORMER_RMSNORM = 1 } cnnlTransformerNormType_t;

cnnlStatus_t cnnlCreate(cnnlHandle_t* handle);
cnnlStatus_t cnnlSetQueue(cnnlHandle_t handle, cnrtQueue_t queue);
const char* cnnlGetErrorString(cnnlStatus_t status);

cnnlStatus_t cnnlCreateTensorDescriptor(cnnlTensorDescriptor_t* desc);
cnnlStatus_t cnnlSetTensorDescriptorEx(cnnlTensorDescriptor_t desc, cnnlTensorLayout_t layout,
                                       cnnlDataType_t dtype, int dimNb, const int dimSize[],
                                       const int dimStride[]);
cnnlStatus_t cnnlDestroyTensorDescriptor(cnnlTensorDescriptor_t desc);

cnnlStatus_t cnnlMatMul(cnnlHandle_t handle, bool is_trans_a, bool is_trans_b,
                        const void* alpha, cnnlTensorDescriptor_t a_desc, const void* a,
                        cnnlTensorDescriptor_t b_desc, const void* b, const void* beta,
                        cnnlTensorDescriptor_t c_desc, void* c);

cnnlStatus_t cnnlCreateFuseNormDescriptor(cnnlFuseNormDescriptor_t* desc);
cnnlStatus_t cnnlSetFuseNormDescriptor(cnnlFuseNormDescriptor_t desc, float eps, float scale,
                                       bool has_norm_scale, bool has_norm_bias,
                                       bool has_residual, bool has_bias,
                                       bool store_output_before_norm,
                                       cnnlDataType_t compute_dtype,
                                       cnnlTransformerNormType_t norm_type);
cnnlStatus_t cnnlGetFuseNormWorkspaceSize(cnnlHandle_t handle, cnnlFuseNormDescriptor_t desc,
                                          cnnlTensorDescriptor_t x_desc, size_t* size);
cnnlStatus_t cnnlFuseNorm(cnnlHandle_t handle, cnnlFuseNormDescriptor_t desc,
                          cnnlTensorDescriptor_t x_desc, const void* x,
                          cnnlTensorDescriptor_t norm_scale_desc, const void* norm_scale,
                          cnnlTensorDescriptor_t norm_bias_desc, const void* norm_bias,
                          cnnlTensorDescriptor_t residual_desc, const void* residual,
                          cnnlTensorDescriptor_t bias_desc, const void* bias, void* workspace,
                          size_t workspace_size, cnnlTensorDescriptor_t y_desc, void* y,
                          cnnlTensorDescriptor_t before_norm_desc, void* before_norm);
cnnlStatus_t cnnlDestroyFuseNormDescriptor(cnnlFuseNormDescriptor_t desc);

cnnlStatus_t cnnlCreateActivationDescriptor(cnnlActivationDescriptor_t* desc);
cnnlStatus_t cnnlSetActivationDescriptor(cnnlActivationDescriptor_t desc,
                                         cnnlActivationMode_t mode,
                                         cnnlNanPropagation_t nan_propagation, float coef);
cnnlStatus_t cnnlActivationForward(cnnlHandle_t handle, cnnlActivationDescriptor_t desc,
                                   const void* alpha, cnnlTensorDescriptor_t x_desc,
                                   const void* x, const void* beta,
                                   cnnlTensorDescriptor_t y_desc, void* y);
cnnlStatus_t cnnlDestroyActivationDescriptor(cnnlActivationDescriptor_t desc);

cnnlStatus_t cnnlCreateOpTensorDescriptor(cnnlOpTensorDescriptor_t* desc);
cnnlStatus_t cnnlSetOpTensorDescriptor(cnnlOpTensorDescriptor_t desc, cnnlOpTensorDesc_t op,
                                       cnnlDataType_t compute_dtype,
                                       cnnlNanPropagation_t nan_propagation);
cnnlStatus_t cnnlGetOpTensorWorkspaceSize(cnnlHandle_t handle, cnnlTensorDescriptor_t a_desc,
                                          cnnlTensorDescriptor_t b_desc,
                                          cnnlTensorDescriptor_t c_desc, size_t* size);
cnnlStatus_t cnnlOpTensor(cnnlHandle_t handle, cnnlOpTensorDescriptor_t desc,
                          const void* alpha1, cnnlTensorDescriptor_t a_desc, const void* a,
                          const void* alpha2, cnnlTensorDescriptor_t b_desc, const void* b,
                          void* workspace, size_t workspace_size, const void* beta,
                          cnnlTensorDescriptor_t c_desc, void* c);
cnnlStatus_t cnnlDestroyOpTensorDescriptor(cnnlOpTensorDescriptor_t desc);

cnnlStatus_t cnnlSoftmaxForward(cnnlHandle_t handle, cnnlSoftmaxAlgorithm_t algorithm,
                                cnnlSoftmaxMode_t mode, const void* alpha,
                                cnnlTensorDescriptor_t x_desc, const void* x, const void* beta,
                                cnnlTensorDescriptor_t y_desc, void* y);

#ifdef __cplusplus
}
#endif

#endif  // QWEN3C_CAMBRICON_API_H_
