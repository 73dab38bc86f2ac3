// The schemas of every attnkit op, declared once. Implementations register per backend in
// the family files beside this one; fake kernels and autograd are registered in Python
// (python/attnkit/_ops.py).
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(attnkit, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? cu_seqlens_q, Tensor? cu_seqlens_k, "
      "int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left, int window_right, "
      "float softcap, int sink_tokens=0, Tensor? alibi_slopes=None) -> (Tensor out, Tensor lse)");
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? cu_seqlens_q, "
      "Tensor? cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, int window_left, "
      "int window_right, float softcap, Tensor? grad_lse=None, int sink_tokens=0, Tensor? alibi_slopes=None) "
      "-> (Tensor dq, Tensor dk, Tensor dv)");
  m.def(
      "attention_varlen_kv(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
      "Tensor? block_table, Tensor? seqused_k, int max_seqlen_q, int max_seqlen_k, bool causal, float scale, "
      "int window_left, int window_right, float softcap, int sink_tokens=0, Tensor? alibi_slopes=None, "
      "str? kv_format=None, int group_size=0, Tensor? k_scale=None, Tensor? k_zero=None, Tensor? v_scale=None, "
      "Tensor? v_zero=None, bool rotated_keys=False) -> (Tensor out, Tensor lse)");
  m.def(
      "decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? block_table, float scale, "
      "float softcap, int window_left, str? kv_format=None, int group_size=0, Tensor? k_scale=None, "
      "Tensor? k_zero=None, Tensor? v_scale=None, Tensor? v_zero=None, bool rotated_keys=False) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "sparse_decode(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor block_table, "
      "Tensor indices, int tokens_per_index, float scale, float softcap, str? kv_format=None, int group_size=0, "
      "Tensor? k_scale=None, Tensor? k_zero=None, Tensor? v_scale=None, Tensor? v_zero=None, bool rotated_keys=False) "
      "-> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_fwd(Tensor q, Tensor k, Tensor v, Tensor kv_block_indices, Tensor kv_block_counts, "
      "int block_size_q, int block_size_k, bool causal, float scale, float softcap, Tensor? column_indices=None, "
      "Tensor? column_counts=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, "
      "int max_seqlen_k=0) -> (Tensor out, Tensor lse)");
  m.def(
      "block_sparse_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor kv_block_indices, "
      "Tensor kv_block_counts, Tensor q_block_indices, Tensor q_block_counts, int block_size_q, int block_size_k, "
      "bool causal, float scale, float softcap, Tensor? grad_lse=None, Tensor? column_indices=None, "
      "Tensor? column_counts=None, Tensor? cu_seqlens_q=None, Tensor? cu_seqlens_k=None, int max_seqlen_q=0, "
      "int max_seqlen_k=0) -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("block_lists_canonical(Tensor indices, Tensor counts, int col_blocks) -> (Tensor indices_c, Tensor counts_c)");
  m.def("block_lists_transpose(Tensor indices, Tensor counts, int col_blocks) -> (Tensor indices_t, Tensor counts_t)");
  m.def("merge_attention_states(Tensor out_a, Tensor lse_a, Tensor out_b, Tensor lse_b) -> (Tensor out, Tensor lse)");
}

// `import attnkit._C` loads this library, which registers the ops above.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "attnkit kernels (torch.ops.attnkit)", -1, nullptr};
  return PyModule_Create(&module);
}
