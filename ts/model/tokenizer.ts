/**
 * The tokenizer of a model folder: tokenizer.json through @huggingface/tokenizers, the chat
 * template of tokenizer_config.json (or chat_template.jinja) through @huggingface/jinja,
 * and a streaming decoder that only ever emits complete UTF-8 text.
 */
import * as fs from 'fs';
import * as path from 'path';
import { Tokenizer as HfTokenizer } from '@huggingface/tokenizers';
import { Template } from '@huggingface/jinja';
import { SqueezeError } from '../errors';

export interface ChatMessage {
  role: string;
  content: string;
}

export interface EncodeOptions {
  /** Add the special tokens the tokenizer's post-processor defines (default false). */
  addSpecialTokens?: boolean;
}

function readJson(file: string): Record<string, unknown> | undefined {
  if (!fs.existsSync(file)) return undefined;
  try {
    return JSON.parse(fs.readFileSync(file, 'utf8'));
  } catch (e) {
    throw new SqueezeError('ERR_FORMAT', `${file}: ${(e as Error).message}`);
  }
}

function tokenText(v: unknown): string | undefined {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as { content?: unknown }).content === 'string') return (v as { content: string }).content;
  return undefined;
}

export class Tokenizer {
  private readonly tok: HfTokenizer;
  private readonly template?: Template;
  readonly config: Record<string, unknown>;
  readonly vocabSize: number;
  readonly bosToken?: string;
  readonly eosToken?: string;

  private constructor(tok: HfTokenizer, config: Record<string, unknown>, template: string | undefined, src: string) {
    this.tok = tok;
    this.config = config;
    this.vocabSize = tok.get_vocab(true).size;
    this.bosToken = tokenText(config.bos_token);
    this.eosToken = tokenText(config.eos_token);
    if (template) {
      try {
        this.template = new Template(template);
      } catch (e) {
        throw new SqueezeError('ERR_FORMAT', `${src}: chat template does not parse (${(e as Error).message})`);
      }
    }
  }

  /** Loads DIR/tokenizer.json (+ tokenizer_config.json, chat_template.jinja where present). */
  static fromDir(dir: string): Tokenizer {
    const file = path.join(dir, 'tokenizer.json');
    const json = readJson(file);
    if (!json) throw new SqueezeError('ERR_FORMAT', `${dir}: no tokenizer.json`);
    const cfgFile = path.join(dir, 'tokenizer_config.json');
    const cfg = readJson(cfgFile) ?? {};
    let template: string | undefined;
    const ct = cfg.chat_template;
    if (typeof ct === 'string') template = ct;
    else if (Array.isArray(ct)) template = (ct.find((t) => t?.name === 'default') ?? ct[0])?.template;
    const jinja = path.join(dir, 'chat_template.jinja');
    if (!template && fs.existsSync(jinja)) template = fs.readFileSync(jinja, 'utf8');
    let tok: HfTokenizer;
    try {
      tok = new HfTokenizer(json, cfg);
    } catch (e) {
      throw new SqueezeError('ERR_FORMAT', `${file}: ${(e as Error).message}`);
    }
    return new Tokenizer(tok, cfg, template, cfgFile);
  }

  encode(text: string, opts: EncodeOptions = {}): Int32Array {
    if (typeof text !== 'string') throw new SqueezeError('ERR_ARG', 'encode: text must be a string');
    return Int32Array.from(this.tok.encode(text, { add_special_tokens: opts.addSpecialTokens ?? false }).ids);
  }

  decode(ids: ArrayLike<number>, opts: { skipSpecialTokens?: boolean } = {}): string {
    if (ids.length === 0) return '';
    return this.tok.decode(Array.from(ids), { skip_special_tokens: opts.skipSpecialTokens ?? false, clean_up_tokenization_spaces: false });
  }

  idToToken(id: number): string | undefined {
    return this.tok.id_to_token(id);
  }

  tokenToId(token: string): number | undefined {
    return this.tok.token_to_id(token);
  }

  get hasChatTemplate(): boolean {
    return !!this.template;
  }

  /** Renders messages through the model's chat template. */
  applyChatTemplate(messages: ChatMessage[], opts: { addGenerationPrompt?: boolean } = {}): string {
    if (!this.template) throw new SqueezeError('ERR_UNSUPPORTED', 'this model has no chat template');
    return this.template.render({
      messages,
      add_generation_prompt: opts.addGenerationPrompt ?? true,
      bos_token: this.bosToken ?? '',
      eos_token: this.eosToken ?? '',
    });
  }

  /** A streaming decoder for one sequence. */
  streamDecoder(opts: { skipSpecialTokens?: boolean } = {}): StreamDecoder {
    return new StreamDecoder(this, opts.skipSpecialTokens ?? true);
  }
}

/**
 * Turns a stream of token ids into text pieces: each push returns the text that became
 * complete (never half a UTF-8 character; '' while a character is still being built).
 */
export class StreamDecoder {
  private ids: number[] = [];
  private prefix = 0;
  private read = 0;
  constructor(private readonly tok: Tokenizer, private readonly skip: boolean) {}

  push(id: number): string {
    this.ids.push(id);
    const opts = { skipSpecialTokens: this.skip };
    const prev = this.tok.decode(this.ids.slice(this.prefix, this.read), opts);
    const cur = this.tok.decode(this.ids.slice(this.prefix), opts);
    if (cur.length > prev.length && !cur.endsWith('\uFFFD')) {
      this.prefix = this.read;
      this.read = this.ids.length;
      return cur.slice(prev.length);
    }
    return '';
  }

  /** Whatever is still held back (an incomplete character decodes as U+FFFD). */
  flush(): string {
    const opts = { skipSpecialTokens: this.skip };
    const prev = this.tok.decode(this.ids.slice(this.prefix, this.read), opts);
    const cur = this.tok.decode(this.ids.slice(this.prefix), opts);
    this.prefix = this.read = this.ids.length;
    return cur.length > prev.length ? cur.slice(prev.length) : '';
  }
}
