"""Retrieval block: encoder, indexes (ScaNN / exact), index building, HTTP client and server.

Consumed by `searche1_jax.retrieval.make_retriever(cfg)`, `launch/build_index.py` and
`launch/serve_retriever.py`. Paper runs (Search-R1 protocol): e5-base-v2 over wiki-18, top-3.
"""
import ml_collections


def get() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.backend = "scann"  # 'scann' | 'exact': load `index_dir` in-process; 'http': a Search-R1 style server at `url`
  c.index_dir = ""  # directory written by launch/build_index.py (manifest.json, embeddings.npy, ...)
  c.corpus_path = ""  # '' = the corpus path recorded in the index manifest; set it when the corpus file moved
  c.encoder = ""  # '' = the encoder recorded in the manifest; else 'minilm' or an HF dir (must match the index)
  c.verify_corpus_lines = True  # on load also count corpus lines (reads the file once), besides size + edge hashes
  c.url = "http://127.0.0.1:8000/retrieve"  # backend='http': the server's /retrieve endpoint
  c.topk = 3  # passages per search (Search-R1: 3); read by the rollouts, not by make_retriever
  # Simulated misses (the demo's noisy retriever, searche1_jax/retrieval/misses.py): this fraction of query
  # texts, drawn by a hash of miss_seed and the text, gets ranks 2..topk+1 instead of 1..topk. 0 = off.
  c.miss_rate = 0.0
  c.miss_seed = 0
  # Search results kept for repeated queries (least recently used dropped past this many; 0 = off): a question's
  # samples often search the same text, in different retriever calls under rollout.schedule='continuous'.
  c.cache_size = 65536

  c.encoding = ml_collections.ConfigDict()
  c.encoding.query_prefix = "auto"  # 'auto' = model convention (e5: 'query: ', minilm: ''); else the literal prefix
  c.encoding.passage_prefix = "auto"  # 'auto' = model convention (e5: 'passage: ', minilm: '')
  c.encoding.query_max_length = 256  # tokens, incl. [CLS]/[SEP] (Search-R1 retriever: 256)
  c.encoding.passage_max_length = 256  # tokens per passage when building an index
  c.encoding.batch_size = 128  # texts per jitted call (rounded up to a multiple of the device count)
  c.encoding.min_bucket = 16  # shortest padded length; lengths are padded to powers of two
  c.encoding.dtype = "float32"  # activation dtype: 'float32' | 'bfloat16' (faster index builds on TPU/GPU)
  c.encoding.precision = "highest"  # matmul precision 'default' | 'high' | 'highest' (TPU/GPU 'default' rounds f32 to bf16/tf32)
  c.encoding.platform = ""  # '' = jax default backend; e.g. 'cpu' to keep query encoding off the accelerator
  c.encoding.num_devices = 0  # 0 = all devices of that platform; the batch axis is sharded over them

  c.scann = ml_collections.ConfigDict()
  c.scann.brute_force_below = 20_000  # corpora with fewer passages use exact ScaNN brute force (no tree, no hashing)
  c.scann.num_leaves = 0  # 0 = auto: ~sqrt(N) partitions
  c.scann.leaves_to_search = 0  # 0 = auto: max(min_leaves_to_search, search_fraction * num_leaves)
  c.scann.search_fraction = 0.05  # auto leaves_to_search as a fraction of num_leaves
  c.scann.min_leaves_to_search = 16  # lower bound of the automatic leaves_to_search
  c.scann.partition_training_sample = 0  # k-means sample for the partitions; 0 = auto: max(100k, 64 per leaf), <= N
  c.scann.hash_training_sample = 50_000  # vectors that train the hashing codebooks (clipped to N)
  c.scann.spherical = True  # spherical k-means partitions (embeddings are unit norm)
  c.scann.dims_per_block = 2  # asymmetric hashing: dimensions per 4-bit (lut16) block
  c.scann.anisotropic_threshold = 0.0  # 0 = plain quantization; 0.2 = ScaNN's score-aware (anisotropic) one: ~2x slower build
  c.scann.hash_type = "lut16"  # 'lut16' (fast, 16 centers per block) | 'lut256'
  c.scann.reorder = 300  # candidates re-scored exactly after hashing (raised to topk when smaller)
  c.scann.reorder_dtype = "float32"  # exact re-scoring store: 'float32' | 'bfloat16' | 'int8' (memory: 4/2/1 bytes)
  c.scann.num_threads = 0  # ScaNN threads for training and batched search; 0 = all cores
  c.scann.query_batch = 32  # queries per thread task in batched search (smaller spreads a batch over more threads)

  c.exact = ml_collections.ConfigDict()
  c.exact.chunk_size = 65_536  # corpus rows per matmul + top-k step
  c.exact.max_resident_bytes = 4 << 30  # embeddings up to this size are put on the device once; else streamed per search
  c.exact.min_query_bucket = 8  # query batches are padded to powers of two >= this (bounds recompiles)

  c.build = ml_collections.ConfigDict()
  c.build.shard_size = 100_000  # passages per encoded shard; each shard is saved when done, a re-run resumes
  c.build.skip_malformed = False  # skip (and count) malformed corpus lines instead of failing on the first

  c.http = ml_collections.ConfigDict()
  c.http.timeout_s = 60.0  # per-request timeout (connect + read)
  c.http.max_retries = 5  # retries after the first attempt on connection errors, timeouts, 429 and 5xx
  c.http.backoff_initial_s = 0.5  # first retry delay; doubles each retry
  c.http.backoff_max_s = 16.0  # cap on the retry delay
  c.http.batch_size = 256  # queries per POST (larger lists are split)

  c.server = ml_collections.ConfigDict()
  c.server.host = "127.0.0.1"  # bind address; use 0.0.0.0 only on a trusted network
  c.server.port = 8000
  c.server.default_topk = 3  # used when a request has no (or a null) topk, as Search-R1's server does
  c.server.max_topk = 100  # larger topk is refused with 400
  c.server.max_queries = 1024  # queries per request
  c.server.max_query_chars = 4096  # characters per query
  c.server.max_body_bytes = 8 << 20  # request bodies above this get 413
  c.server.backlog = 256  # connections queued by the OS before accept (stdlib default 5: a pod's hosts get resets)
  c.server.workers = 64  # requests served at once (threads); more wait for a free one
  c.server.idle_timeout_s = 30.0  # a connection silent this long is closed
  return c
