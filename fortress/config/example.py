"""The commented example ``fortress init`` writes; it documents the real defaults (tested)."""

EXAMPLE_CONFIG = """\
# fortress.yaml: Fortress configuration. Every key is optional unless marked.
# Any key can be overridden from the environment: FORTRESS__SERVER__PORT=9000.

server:
  host: 127.0.0.1          # address the gateway listens on
  port: 8080
  workers: auto            # gateway processes on the port: auto = the usable cores for serve, 1 for up
  max_body_bytes: 4194304  # larger requests get 413
  log_level: info
  header_timeout: 10       # seconds to send the request line and headers (else 408)
  body_timeout: 30         # seconds for a body, plus 1 s per min_upload_rate bytes (else 408)
  min_upload_rate: 16384   # bytes/s
  keepalive_timeout: 75    # seconds an idle keep-alive connection stays open
  # max_connections: 4096  # default: from the open-file limit; past it only /health, /ready, /metrics, /admin
  reserved_connections: 32 # connections past max_connections kept for those paths
  max_headers: 100         # more: 431
  max_header_bytes: 32768  # URL + header names and values; more: 431
  trusted_proxies: []      # IPs/CIDRs of your load balancer; empty: X-Forwarded-For is never believed

timeouts:                  # seconds, towards the replicas
  connect: 5
  first_byte: 120          # until the replica starts answering (non-stream: the whole answer)
  idle: 60                 # longest silence between two chunks of a stream
  total: 600

routing:
  max_attempts: 3          # replicas tried for one request, when nothing reached the client yet
  when_all_unhealthy: fail_open   # fail_open: try them anyway (like an ALB); reject: 503
  retry_after: 5           # Retry-After seconds on a 503
  engine_metrics_interval: 10   # seconds between scrapes of each replica's /metrics (engine load); 0: off

pools:
  - model: smollm2         # the id the replicas report in /v1/models (required match)
    # name: smollm2        # the pool's name in metrics and status (default: the model)
    aliases: [gpt-4o-mini] # extra names clients may use for this model
    health_check:          # ALB-style target health
      path: /health
      interval: 10
      timeout: 5
      healthy_threshold: 2
      unhealthy_threshold: 2
      expected_status: 200 # or "200-299"
    # outlier:             # passive health from real traffic (Envoy-style outlier detection)
    #   consecutive_5xx: 5            # 5xx answers in a row that eject a replica; 0: off
    #   consecutive_gateway_failure: 5   # timeouts, resets, 502/503/504 in a row; 0: off
    #   base_ejection_time: 30        # seconds out, times the ejections in a row
    #   max_ejection_time: 300
    #   max_ejection_percent: 50      # of a tier at once (one replica may always be ejected)
    #   panic_threshold: 0            # percent healthy below which the tier spills over; 0: off
    # balancer: least_outstanding     # how a replica is picked within a tier
    deregistration_delay: 30   # seconds a draining replica may finish its requests
    replicas:
      - url: http://127.0.0.1:8081
        tier: primary      # primary | secondary | standby
        # name: gpu-a      # a stable name in metrics and status (default: from pool and index)
      - url: http://127.0.0.1:8082
        tier: secondary
      # - engine: llamacpp     # a local llama-server started by `fortress up -c` (not `serve`)
      #   count: 1
      #   options: {model: ./model.gguf, threads: 4, ctx_size: 4096}   # default: the embedded model

state_dir: .fortress       # server secret, audit journal, SQLite store, logs

auth:                      # API keys: Authorization: Bearer <key> or x-api-key: <key>
  enabled: true            # off only when written here: enabled: false
  cache_refresh: 2         # seconds; a revoked key stops working within this on every gateway
  rotation_grace: 86400    # seconds an old key keeps working after `fortress keys rotate`
  # secret: ...            # gateways sharing a database must share it (FORTRESS__AUTH__SECRET)

plans:                     # usage plans; a key belongs to one (fortress keys create --plan)
  default:
    rate: 5                # requests per second (token bucket refill)
    burst: 10              # bucket size
    max_concurrent: null   # requests in flight per key
    requests: {day: 5000}  # quotas per UTC day / week / month
    input_tokens: {}       # e.g. {month: 10000000}
    output_tokens: {}
    default_max_tokens: 2048   # output tokens reserved when a request sets no max_tokens

limits:
  backend: memory          # memory (one gateway) | redis (several gateways share the limits)
  redis_url: redis://127.0.0.1:6379/0
  fail_open: true          # Redis out: admit through a local limiter per gateway (true) or 503 (false)
  timeout: 0.25            # seconds a Redis call may take
  breaker_failures: 3      # failures in a row that open the circuit (no Redis calls) ...
  breaker_reset: 5         # ... for this many seconds

audit:
  enabled: true
  required_headers: [x-llm-source, x-llm-user, x-llm-request-type]
  max_header_bytes: 256    # longer audit headers get 400
  body_capture: none       # none | metadata | full (with redact_fields replaced)
  max_body_capture_bytes: 65536
  redact_fields: [messages, prompt]
  min_free_bytes: 268435456  # below this free space on the journal's disk, new requests get 503
  archive_dir: null        # JSONL.gz per day: a directory, or s3://bucket/prefix

database:
  url: null                # default sqlite:///<state_dir>/fortress.db; or postgresql+psycopg://user:pass@host/db

observe:
  metrics: true            # GET /metrics (admin token, or this machine only, unless metrics_public)
  dashboard: true          # GET /dashboard
  access_log: {enabled: true, stream: stdout}
  alarms:
    notify: {log: true, webhooks: []}   # Slack-compatible webhooks; sns_topic_arn for AWS SNS
"""
