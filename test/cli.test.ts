import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import { main } from '../ts/cli/main';
import { loadModel } from '../ts/model/model';
import { SafetensorsFile } from '../ts/model/safetensors';

const PYCODER = path.join(__dirname, '..', 'models', 'pycoder-mini');

async function run(args: string[]): Promise<{ code: number; out: string; err: string }> {
  let out = '', err = '';
  const o = jest.spyOn(process.stdout, 'write').mockImplementation((s: string | Uint8Array) => {
    out += s.toString();
    return true;
  });
  const e = jest.spyOn(process.stderr, 'write').mockImplementation((s: string | Uint8Array) => {
    err += s.toString();
    return true;
  });
  try {
    const code = await main(args);
    return { code, out, err };
  } finally {
    o.mockRestore();
    e.mockRestore();
  }
}

describe('squeezelm CLI', () => {
  test('ppl --prefix-tokens: the rest of each window after a cached prefix, dense or squeezed', async () => {
    const data = path.join(PYCODER, 'eval.safetensors');
    // 200 tokens end inside a 16-token page: the window's fork copies that page (the pool holds it)
    const args = ['ppl', '--data', data, '--windows', '2', '--window', '256', '--prefix-tokens', '200', '--device', 'cpu', '--json'];
    const dense = JSON.parse((await run(args)).out), all = JSON.parse((await run([...args, '--squeeze', '1', '--clusters', '12'])).out);
    const few = JSON.parse((await run([...args, '--squeeze', '0.25', '--clusters', '12'])).out);
    expect(dense).toMatchObject({ mode: 'prefix', prefixTokens: 200, windows: 2, tokens: 2 * 55 });
    expect(Math.abs(all.ppl / dense.ppl - 1)).toBeLessThan(1e-4);
    expect(few).toMatchObject({ squeeze: 0.25, clusters: 12 });
    expect(few.ppl).not.toBe(dense.ppl);
    expect((await run(['ppl', '--data', data, '--squeeze', '0.5'])).err).toMatch(/need --prefix-tokens/);
    expect((await run(['ppl', '--data', data, '--window', '64', '--prefix-tokens', '63'])).err).toMatch(/--prefix-tokens must be 1 \.\. 62/);
  });

  test('ppl and generate take a LoRA adapter (--lora), sizing the pool to it', async () => {
    const a8 = path.join(__dirname, 'fixtures', 'tiny-llama-gqa', 'adapters', 'a8');
    const data = path.join(PYCODER, 'eval.safetensors');
    const base = await run(['ppl', '--data', data, '--windows', '1', '--window', '128', '--device', 'cpu', '--json']);
    const lo = await run(['ppl', '--data', data, '--windows', '1', '--window', '128', '--device', 'cpu', '--json', '--lora', `x=${a8}`]);
    expect(lo.code).toBe(0);
    const [b, l] = [JSON.parse(base.out), JSON.parse(lo.out)];
    expect(l.adapter).toBe('x');
    expect(Math.abs(l.ppl / b.ppl - 1)).toBeGreaterThan(0.01);
    const g = await run(['generate', '--prompt', 'def f(x):', '--max-tokens', '4', '--device', 'cpu', '--lora', a8]);
    expect(g.code).toBe(0);
    const bad = await run(['ppl', '--data', data, '--windows', '1', '--device', 'cpu', '--lora', a8, '--lora-rank', '4']);
    expect(bad.code).toBe(1);
    expect(bad.err).toMatch(/ERR_ARG .*needs 16 rows at one site/);
    expect((await run(['ppl', '--data', data, '--lora-rank', '4'])).err).toMatch(/--lora-slots \/ --lora-rank need --lora/);
  });

  test('a reader that closes the pipe early (generate | head) ends the command quietly', async () => {
    const { spawn } = await import('child_process');
    const bin = path.join(__dirname, '..', 'bin', 'squeezelm.js');
    const child = spawn(process.execPath, [bin, 'generate', '--prompt', 'def f(x):', '--max-tokens', '400', '--device', 'cpu'],
      { stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '', got = '';
    child.stderr.on('data', (d) => { err += d.toString(); });
    child.stdout.once('data', (d) => { got += d.toString(); child.stdout.destroy(); });
    const code = await new Promise<number | null>((resolve) => child.on('close', (c) => resolve(c)));
    expect(got.length).toBeGreaterThan(0);
    expect(err).not.toMatch(/EPIPE|Error|at /);
    expect(code).toBe(0);
  });

  test('--help', async () => {
    const r = await run(['--help']);
    expect(r.code).toBe(0);
    expect(r.out).toContain('squeezelm generate');
    expect(r.out).toContain('squeezelm ppl');
  });

  test('generate streams the greedy continuation (default model)', async () => {
    const ref = JSON.parse(fs.readFileSync(path.join(PYCODER, 'reference.json'), 'utf8'));
    const r = await run(['generate', '--prompt', ref.greedy_prompt, '--max-tokens', '12', '--device', 'cpu']);
    expect(r.code).toBe(0);
    const text = r.out.replace(/\n$/, '');
    expect(text.length).toBeGreaterThan(5);
    expect(ref.greedy_text.startsWith(text)).toBe(true);
  });

  test('ppl: safetensors windows and text files print one JSON line', async () => {
    const r = await run(['ppl', '--model', PYCODER, '--data', path.join(PYCODER, 'eval.safetensors'), '--windows', '1', '--device', 'cpu', '--json']);
    expect(r.code).toBe(0);
    const j = JSON.parse(r.out.trim());
    expect(j.windows).toBe(1);
    expect(j.tokens).toBe(1023);
    expect(j.device).toBe('cpu');
    expect(j.ppl).toBeGreaterThan(1);
    expect(j.ppl).toBeLessThan(30);
    const txt = path.join(os.tmpdir(), `sqz-ppl-${process.pid}.txt`);
    fs.writeFileSync(txt, 'import os\nimport sys\n\n\ndef main(argv):\n    for arg in argv:\n        print(arg)\n'.repeat(20));
    try {
      const t = await run(['ppl', '--data', txt, '--window', '64', '--windows', '2', '--device', 'cpu', '--json']);
      expect(t.code).toBe(0);
      const k = JSON.parse(t.out.trim());
      expect(k.windows).toBe(2);
      expect(k.tokens).toBe(126);
    } finally {
      fs.rmSync(txt, { force: true });
    }
  });

  test('calibrate-kv, then generate and ppl with the quantized cache', async () => {
    const cal = path.join(os.tmpdir(), `sqz-kv-${process.pid}.safetensors`);
    try {
      const c = await run(['calibrate-kv', '--calib', path.join(PYCODER, 'calib.safetensors'), '--windows', '2', '--bits', '4',
        '--out', cal, '--device', 'cpu', '--slots', 'uniform']);
      expect(c.code).toBe(0);
      expect(fs.statSync(cal).size).toBeGreaterThan(0);
      const ref = JSON.parse(fs.readFileSync(path.join(PYCODER, 'reference.json'), 'utf8'));
      const args = ['generate', '--prompt', ref.greedy_prompt, '--max-tokens', '8', '--device', 'cpu'];
      const g = await run([...args, '--kv-bits', '4', '--kv-calib', cal]);
      expect(g.code).toBe(0);
      // the same greedy continuation as the API with that cache
      const m = await loadModel(PYCODER, { device: 'cpu', maxBatch: 1, kvCache: { bits: 4, calibration: cal } });
      try {
        let want = '';
        for await (const e of m.generate({ prompt: ref.greedy_prompt, maxTokens: 8 })) want += e.text ?? '';
        expect(g.out).toBe(want + '\n');
        expect(want.length).toBeGreaterThan(3);
      } finally {
        await m.dispose();
      }
      const p = await run(['ppl', '--data', path.join(PYCODER, 'eval.safetensors'), '--windows', '1', '--window', '128', '--kv-bits', '4',
        '--kv-calib', cal, '--device', 'cpu', '--json']);
      expect(p.code).toBe(0);
      const j = JSON.parse(p.out.trim());
      expect(j).toMatchObject({ mode: 'decode', kvBits: 4, tokens: 127 });
      expect(j.kvBytesPerToken).toBeGreaterThan(0);
      for (const [bad, msg] of [[['--kv-bits', '5', '--kv-calib', cal], /--kv-bits must be/], [['--kv-bits', '2'], /needs --kv-calib/],
        [['--kv-calib', cal], /needs --kv-bits/], [['--kv-bits', '2', '--kv-calib', cal], /bits/]] as Array<[string[], RegExp]>) {
        const e = await run([...args, ...bad]);
        expect(e.code).toBe(1);
        expect(e.err).toMatch(/^squeezelm: ERR_(ARG|FORMAT) /);
        expect(e.err).toMatch(msg);
      }
    } finally {
      fs.rmSync(cal, { force: true });
    }
  });

  test('text calibration files: calibrate-kv --window and quantize --calib-window', async () => {
    const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-textcal-'));
    try {
      const txt = path.join(tmp, 'calib.txt');
      fs.writeFileSync(txt, 'import os\n\n\ndef walk(root):\n    for d, _, files in os.walk(root):\n        yield from files\n'.repeat(60));
      const c = await run(['calibrate-kv', '--calib', txt, '--window', '96', '--windows', '3', '--bits', '3', '--out', path.join(tmp, 'kv.safetensors'),
        '--device', 'cpu', '--allocate-windows', '1']);
      expect(c.code).toBe(0);
      const cj = JSON.parse(c.out.trim());
      expect(cj).toMatchObject({ windows: 3, bits: 3 });
      // outlier slots allocated per layer (the default) within the uniform share's bytes: 6 layers x 2 kv heads x (2 x 32 + 12)
      expect(cj.keySlots).toHaveLength(6);
      expect(cj.valueSlots).toHaveLength(6);
      expect(cj.bytesPerToken).toBeLessThanOrEqual(912);
      expect(c.err).toContain('calibrate-kv: outlier slots, prefill 67/67');
      // --lm-head on a tied model: its embedding matrix quantized as lm_head, the embeddings kept, the config untied
      const q = await run(['quantize', '--model', PYCODER, '--calib', txt, '--calib-window', '96', '--calib-windows', '2', '--bits', '4',
        '--out', path.join(tmp, 'q4'), '--device', 'cpu', '--lm-head']);
      expect(q.code).toBe(0);
      const cfg = JSON.parse(fs.readFileSync(path.join(tmp, 'q4', 'config.json'), 'utf8'));
      expect(cfg.quantization_config).toMatchObject({ bits: 4, sensitivity: 'activations', lm_head: true });
      expect(cfg.tie_word_embeddings).toBe(false);
      const qf = SafetensorsFile.open(path.join(tmp, 'q4', 'model.safetensors'));
      try {
        expect([qf.has('lm_head.qweight'), qf.has('lm_head.weight'), qf.has('model.embed_tokens.weight')]).toEqual([true, false, true]);
      } finally {
        qf.close();
      }
      // the calibration statistics cover the lm_head's input (the final norm's output)
      const { activationStats } = await import('../ts/quant/calib');
      const stats = await activationStats(PYCODER, txt, 1, 1, undefined, 96);
      expect(stats.get('lm_head')?.length).toBe(256);
      expect(stats.get('lm_head')!.every((v) => v > 0)).toBe(true);
      const info = await run(['info', '--model', path.join(tmp, 'q4'), '--device', 'cpu', '--json', '--kv-bits', '3', '--kv-calib',
        path.join(tmp, 'kv.safetensors')]);
      expect(info.code).toBe(0);
      const j = JSON.parse(info.out);
      expect(j.quantization).toMatchObject({ method: 'squeezellm', bits: [4], modules: 25, lmHead: true });
      expect(j.quantization.bytes).toBeGreaterThan(0);
      expect(j.kvCache).toEqual({ bits: 3, quantized: true, bytesPerToken: cj.bytesPerToken });
      const p = await run(['ppl', '--model', path.join(tmp, 'q4'), '--data', txt, '--window', '96', '--windows', '2', '--device', 'cpu', '--json']);
      expect(p.code).toBe(0);
      expect(JSON.parse(p.out.trim()).tokens).toBe(190);
      const bad = await run(['calibrate-kv', '--calib', txt, '--window', '1', '--bits', '3', '--out', path.join(tmp, 'x.safetensors')]);
      expect(bad.err).toMatch(/^squeezelm: ERR_ARG --window must be a whole number/);
      for (const [flags, msg] of [[['--slots', 'some'], /--slots must be auto or uniform/], [['--allocate-windows', '0'], /--allocate-windows must be/]] as Array<[string[], RegExp]>) {
        const e = await run(['calibrate-kv', '--calib', txt, '--bits', '3', '--out', path.join(tmp, 'x.safetensors'), ...flags]);
        expect(e.code).toBe(1);
        expect(e.err).toMatch(msg);
      }
      const bad2 = await run(['quantize', '--model', PYCODER, '--calib', txt, '--calib-window', '12.5', '--out', path.join(tmp, 'x')]);
      expect(bad2.err).toMatch(/^squeezelm: ERR_ARG --calib-window/);
    } finally {
      fs.rmSync(tmp, { recursive: true, force: true });
    }
  });

  test('info and errors', async () => {
    const i = await run(['info', '--device', 'cpu', '--json']);
    expect(i.code).toBe(0);
    expect(JSON.parse(i.out).parameters).toBe(5770496);
    expect(JSON.parse(i.out).quantization).toBeUndefined();
    expect(JSON.parse(i.out).kvCache).toEqual({ bits: 32, quantized: false, bytesPerToken: 6144 });
    const bad = await run(['frobnicate']);
    expect(bad.code).toBe(1);
    expect(bad.err).toMatch(/^squeezelm: ERR_ARG /);
    const nomodel = await run(['generate', '--model', '/nonexistent-model', '--prompt', 'x']);
    expect(nomodel.code).toBe(1);
    expect(nomodel.err).toMatch(/^squeezelm: ERR_ARG .*nonexistent-model/);
    const long = await run(['ppl', '--data', path.join(PYCODER, 'eval.safetensors'), '--window', '2000', '--device', 'cpu']);
    expect(long.err).toMatch(/^squeezelm: ERR_ARG .*window 2000 must be an integer in \[2, 1024\]/);
    // a one-token window predicts nothing
    const one = await run(['ppl', '--data', path.join(PYCODER, 'eval.safetensors'), '--window', '1', '--windows', '1', '--device', 'cpu']);
    expect(one.err).toMatch(/^squeezelm: ERR_ARG .*window 1 must be an integer in \[2, 1024\]/);
    const dev = await run(['generate', '--prompt', 'x', '--device', 'tpu']);
    expect(dev.err).toMatch(/^squeezelm: ERR_DEVICE/);
  });
});
