// Type declarations for longlink.js (the module itself needs no build step).

/** Control methods (`service` 0). */
export declare const Method: Readonly<{
  HELLO: 1; PING: 2; PONG: 3; ACK: 4; BYE: 5; REDIRECT: 6; ERROR: 7; PUSH: 8;
}>;

/** A decoded Frame (docs/PROTOCOL.md). 64-bit values past 2^53 come as bigint. */
export interface Frame {
  seqid: number | bigint;
  logid: number | bigint;
  service: number;
  method: number;
  headers: Array<[string, string]>;
  payloadEncoding: string;
  payloadType: string;
  payload: Uint8Array;
}

/** What `encodeFrame` takes: any field may be left out. */
export interface FrameInit {
  seqid?: number | bigint;
  logid?: number | bigint;
  service?: number;
  method?: number;
  headers?: Record<string, string> | Array<[string, string]>;
  payloadEncoding?: string;
  payloadType?: string;
  payload?: Uint8Array | ArrayBuffer | ArrayBufferView | string;
}

export declare function encodeFrame(f: FrameInit): Uint8Array;
/** Throws an Error on malformed input. */
export declare function decodeFrame(data: Uint8Array | ArrayBuffer): Frame;
/** The first header named `name`. */
export declare function header(frame: Frame, name: string): string | undefined;

/** Full-jitter backoff: uniform in [0, min(max, min * 2^attempt)] ms. */
export declare function backoffDelay(
  attempt: number,
  bounds?: { min?: number; max?: number },
  random?: () => number,
): number;

/** An ERROR frame (`code` is its HTTP-like code) or a local failure (`code` 0, or 504 for a timeout). */
export declare class LonglinkError extends Error {
  code: number;
  constructor(code: number, message: string);
}

/** A push as the `push` event gives it (also a request's answer). */
export interface Push {
  /** The whole frame; null in raw mode. */
  frame: Frame | null;
  seqid: number | bigint;
  service: number;
  method: number;
  payloadType: string;
  /** Set on `ack=1` pushes: the same on every redelivery. */
  pushId: string | undefined;
  payload: Uint8Array;
  header(name: string): string | undefined;
  text(): string;
  json(): unknown;
}

export interface LonglinkOptions {
  /** The gateway's WebSocket endpoint, e.g. `ws://host:7101/ws` (or `wss://`). */
  url?: string;
  /**
   * Where to learn the node to dial: a URL on the app's backend answering like the
   * gateway's `GET /v1/endpoints?transport=ws`, or a function resolving to a ws URL.
   * Falls back to `url`.
   */
  endpoints?: string | (() => Promise<string | null | undefined> | string | null | undefined);
  app: string;
  device: string;
  /**
   * The credential sent at each dial; a function (sync or async) is asked again at every
   * dial, so a short-lived token (a JWT) can be fetched fresh.
   */
  token?: string | (() => string | Promise<string>);
  user?: string;
  /** `pbbp2` (default): Frames, ACKs, requests. `raw`: payloads only (browsers' simplest). */
  mode?: 'pbbp2' | 'raw';
  /** Reconnect backoff bounds in ms (defaults 500 and 20000). */
  backoff?: { min?: number; max?: number };
  /** Default timeout of `request()` in ms (10000). */
  requestTimeout?: number;
  /** After a heartbeat PING, how long to wait for anything before giving the link up (5000 ms). */
  pongTimeout?: number;
  /** How long a dial may take up to the gateway's HELLO (10000 ms); a token function too. */
  connectTimeout?: number;
  /** The largest request Frame to send (65535): a larger one is refused locally (413). Once connected, the gateway's HELLO may announce a lower limit, which then applies. */
  maxFrameBytes?: number;
  /** How long a link must stay up before the reconnect backoff starts again (5000 ms). */
  stableAfter?: number;
  /** How many reliable push ids to remember for de-duplication (4096). */
  dedupWindow?: number;
  /** Reconnect at all (true). */
  reconnect?: boolean;
  /** Reconnect after a kick (a BYE whose reason is not shutdown/restart/draining): false. */
  reconnectOnKick?: boolean;
  /** A WebSocket constructor where there is no global one (Node < 22: the `ws` package). */
  WebSocket?: unknown;
  /** The random source for backoff jitter (Math.random). */
  random?: () => number;
}

export interface ConnectedEvent { connId: string | null; nodeId: string | null; url: string }
export interface DisconnectedEvent {
  code: number;
  reason: string;
  willReconnect: boolean;
  /** The wait before the next dial, in ms (null when not reconnecting). */
  delay: number | null;
  wasOpen: boolean;
}

export interface RequestOptions {
  /** Resolve on the service's answer (true, default) or on the gateway's ACK (false). */
  answer?: boolean;
  timeout?: number;
  headers?: Record<string, string> | Array<[string, string]>;
  payloadType?: string;
  logid?: number | bigint;
}

export declare class Longlink {
  constructor(options: LonglinkOptions);
  readonly connected: boolean;
  connId: string | null;
  nodeId: string | null;
  stats: { connects: number; pushes: number; duplicates: number; acks: number; redirects: number };
  on(event: 'connected', fn: (e: ConnectedEvent) => void): this;
  on(event: 'disconnected', fn: (e: DisconnectedEvent) => void): this;
  on(event: 'push', fn: (p: Push) => void): this;
  on(event: 'error', fn: (e: Error) => void): this;
  off(event: string, fn: (...args: any[]) => void): this;
  connect(): this;
  close(code?: number, reason?: string): void;
  /** pbbp2: an upstream frame to service `service` (> 0); its answer (or `{acked: true}`). */
  request(
    service: number,
    method: number,
    payload?: Uint8Array | ArrayBuffer | string,
    options?: RequestOptions,
  ): Promise<Push | { acked: true }>;
  /** Raw mode: a message to the app's default service. */
  send(data: string | Uint8Array | ArrayBuffer): void;
}

export interface StatusValue { data: unknown; version: number }
/** One long-poll of a status key; null when its timeout (seconds) ran out first. */
export declare function pollStatus(
  base: string,
  key: string,
  options?: { timeout?: number; since?: number; signal?: AbortSignal },
): Promise<StatusValue | null>;
/** Every new value of a status key, in order, until `onValue` returns true or `signal` aborts. */
export declare function followStatus(
  base: string,
  key: string,
  onValue: (data: unknown, version: number) => boolean | void,
  options?: { signal?: AbortSignal; timeout?: number; retryMs?: number },
): Promise<void>;
