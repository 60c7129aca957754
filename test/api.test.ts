/**
 * The public entry point (what `require('squeezelm')` gives): the KV cache calibration and the
 * quantizers are reachable from it, and a calibration made through it serves loadModel.
 */
import * as fs from 'fs';
import * as os from 'os';
import * as path from 'path';
import * as squeezelm from '../ts';
import { rng } from './gpu';

const TINY = path.join(__dirname, 'fixtures', 'tiny-llama-gqa');

test('calibrateKv, saveKvqCalibration and loadKvqCalibration from the package entry; the cache then serves generation', async () => {
  for (const name of ['calibrateKv', 'loadKvqCalibration', 'saveKvqCalibration', 'quantizeModel', 'convertCheckpoint', 'loadModel'] as const)
    expect(typeof squeezelm[name]).toBe('function');
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'sqz-api-'));
  const model = await squeezelm.loadModel(TINY, { device: 'cpu', maxBatch: 2 });
  try {
    const r = rng(3), V = model.config.vocabSize;
    const windows = [0, 1].map(() => Int32Array.from({ length: 40 }, () => Math.floor(r() * V)));
    const cal = await squeezelm.calibrateKv(model, windows, { bits: 3, sink: 1, allocateWindows: 1 });
    expect(cal.slots?.key).toHaveLength(model.config.numLayers);
    const file = path.join(tmp, 'kv3.safetensors');
    squeezelm.saveKvqCalibration(file, cal);
    const back = squeezelm.loadKvqCalibration(file, { bits: 3, layers: model.config.numLayers });
    expect(back.slots).toEqual(cal.slots);
    const q = await squeezelm.loadModel(TINY, { device: 'cpu', maxBatch: 1, kvCache: { bits: 3, calibration: file } });
    try {
      expect(q.kvCache).toMatchObject({ bits: 3, quantized: true });
      const [out] = await q.generateBatch([{ ids: windows[0].subarray(0, 8), maxTokens: 5 }]);
      expect(out.error).toBeUndefined();
      expect(out.ids.length).toBeGreaterThan(0);
      expect(out.ids.length).toBeLessThanOrEqual(5);
    } finally {
      await q.dispose();
    }
  } finally {
    await model.dispose();
    fs.rmSync(tmp, { recursive: true, force: true });
  }
});
