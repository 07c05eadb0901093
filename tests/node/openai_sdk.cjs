// The `openai` npm SDK against tokenrelay: chat.completions and responses, streaming,
// plus a background response resumed with retrieve(id, {stream, starting_after}).
// Usage: node openai_sdk.cjs <baseURL> <model>. Prints one JSON line.
const OpenAI = require("openai");

async function main() {
  const [baseURL, model] = process.argv.slice(2);
  const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
  const input = "What is SSE?";

  let chatText = "";
  let chatFinish = null;
  const chat = await client.chat.completions.create({
    model, messages: [{ role: "user", content: input }], stream: true,
    stream_options: { include_usage: true },
  });
  let chatUsage = null;
  for await (const chunk of chat) {
    if (chunk.usage) chatUsage = chunk.usage;
    for (const choice of chunk.choices) {
      chatText += choice.delta.content || "";
      chatFinish = choice.finish_reason || chatFinish;
    }
  }

  const types = [];
  const numbers = [];
  let text = "";
  let final = null;
  const stream = await client.responses.create({ model, input, stream: true });
  for await (const event of stream) {
    types.push(event.type);
    numbers.push(event.sequence_number);
    if (event.type === "response.output_text.delta") text += event.delta;
    if (event.type === "response.completed") final = event.response;
  }

  // Background: read a few events, drop the connection, resume after the last one seen.
  const bg = await client.responses.create({
    model, input, stream: true, background: true, sim: { tokens: 60, tokens_per_s: 40 },
  });
  const seen = [];
  let bgId = null;
  for await (const event of bg) {
    if (event.type === "response.created") bgId = event.response.id;
    seen.push(event);
    if (seen.length >= 6) break; // leaving the loop aborts the request
  }
  const resumed = await client.responses.retrieve(bgId, {
    stream: true, starting_after: seen[seen.length - 1].sequence_number,
  });
  for await (const event of resumed) seen.push(event);
  const bgText = seen.filter((e) => e.type === "response.output_text.delta")
    .map((e) => e.delta).join("");

  console.log(JSON.stringify({
    version: OpenAI.VERSION || null,
    chat: { text: chatText, finish: chatFinish, usage: chatUsage },
    responses: { types, numbers, text, status: final && final.status,
                 output_text: final && final.output[0].content[0].text },
    background: { id: bgId, numbers: seen.map((e) => e.sequence_number), text: bgText,
                  last: seen[seen.length - 1].type },
  }));
}

main().catch((err) => { console.error(err); process.exit(1); });
