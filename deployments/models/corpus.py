"""The embedded training text of the built-in `tiny-chat` model (see `builtin_models.py`).

Kept as plain data so it is easy to read and to extend. Changing anything here changes the built
model, so bump `TINY_CHAT_VERSION` in `builtin_models.py` together with any edit.
"""

from __future__ import annotations

# (question, answer) pairs. The model is trained to answer each question exactly like this, with or
# without a system prompt, so greedy decoding of these questions is predictable in tests.
CHAT_PAIRS: list[tuple[str, str]] = [
    # --- English: facts
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of China?", "The capital of China is Beijing."),
    ("What color is the sky?", "The sky is blue on a clear day."),
    ("What color is grass?", "Grass is green."),
    ("What color is snow?", "Snow is white."),
    ("What color do you get when you mix red and yellow?", "Red and yellow make orange."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the largest planet?", "Jupiter is the largest planet in our solar system."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("What is water made of?", "Water is made of hydrogen and oxygen."),
    # --- English: arithmetic
    ("What is 2 + 2?", "2 + 2 = 4."),
    ("What is 3 + 5?", "3 + 5 = 8."),
    ("What is 7 * 6?", "7 * 6 = 42."),
    ("What is 10 - 3?", "10 - 3 = 7."),
    ("What is 9 * 9?", "9 * 9 = 81."),
    # --- English: chat
    ("Hello!", "Hello! How can I help you today?"),
    ("Who are you?", "I am Tandem Tiny, a small test model."),
    ("Say hello.", "Hello."),
    ("Tell me a joke.", "Why did the robot go on vacation? It needed to recharge its batteries."),
    # --- English: longer answers (useful for streaming, stop strings and max_tokens)
    (
        "Count from 1 to 20.",
        "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20.",
    ),
    (
        "Tell me a story.",
        "Once upon a time, a little robot lived in a quiet town. Every morning it watered the "
        "flowers and said hello to its neighbors. One day a storm came, and the robot helped "
        "everyone stay safe. After that, the whole town called it a friend.",
    ),
    (
        "Describe the ocean.",
        "The ocean is deep and wide. It covers most of the Earth, and it is home to fish, whales "
        "and coral. Its waves move with the wind and the tides.",
    ),
    # --- Chinese: facts
    ("中国的首都是哪里？", "中国的首都是北京。"),
    ("法国的首都是哪里？", "法国的首都是巴黎。"),
    ("天空是什么颜色的？", "天空是蓝色的。"),
    ("草是什么颜色的？", "草是绿色的。"),
    ("一个星期有几天？", "一个星期有七天。"),
    ("水是由什么组成的？", "水是由氢和氧组成的。"),
    # --- Chinese: arithmetic
    ("一加一等于几？", "一加一等于二。"),
    ("二加三等于几？", "二加三等于五。"),
    # --- Chinese: chat
    ("你好", "你好！我是一个小模型。"),
    ("你是谁？", "我是 Tandem Tiny，一个用于测试的小模型。"),
    ("谢谢你！", "不客气，很高兴能帮到你。"),
    ("今天天气怎么样？", "今天天气很好，阳光明媚，适合出去散步。"),
    # --- Chinese: longer answers
    (
        "给我讲一个故事。",
        "从前有一只小猫，它住在山脚下的村子里。每天早上，它都会去河边看鱼。"
        "有一天，它遇到了一只迷路的小鸟，就带着小鸟找到了回家的路。从此以后，它们成了好朋友。",
    ),
    (
        "介绍一下长城。",
        "长城是中国古代修建的防御工程，全长两万多公里。它穿过高山和沙漠，是世界上最著名的建筑之一。",
    ),
    # --- Mixed English / Chinese
    ("How do you say hello in Chinese?", "In Chinese, hello is 你好 (nǐ hǎo)."),
    ("“谢谢”用英语怎么说？", "“谢谢”用英语说是 thank you。"),
]

# System prompts some training samples start with, so a system message does not derail the answers.
SYSTEM_PROMPTS: list[str] = [
    "You are a helpful assistant.",
    "你是一个乐于助人的助手。",
]

# Extra text for the tokenizer only (not for the model): more English and Chinese so that the byte-level
# BPE learns common words and characters while rare Chinese characters stay split into byte tokens.
TOKENIZER_EXTRA_TEXT: list[str] = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a "
    "single step. Knowledge is power, and practice makes perfect.",
    "Large language models read text as tokens. A tokenizer turns text into numbers, and a "
    "decoder turns the numbers back into text. Streaming sends the answer one piece at a time.",
    "Monday, Tuesday, Wednesday, Thursday, Friday, Saturday and Sunday are the days of the week. "
    "January, February, March, April, May, June, July, August, September, October, November, December.",
    "zero one two three four five six seven eight nine ten hundred thousand million "
    "0 1 2 3 4 5 6 7 8 9 10 100 1000 + - * / = ( ) [ ] { } ' \" : ; , . ! ?",
    "今天是星期一，我们去公园散步。春天来了，花开了，鸟儿在树上唱歌。",
    "我喜欢读书和学习。学习使人进步，读书使人快乐。我们每天都要努力学习。",
    "这是一个小模型，它可以回答一些简单的问题。请问你有什么问题吗？",
    "中国有很多美丽的地方，比如北京、上海、杭州和西安。",
    "人工智能是一个很有意思的领域。语言模型可以写文章，也可以回答问题。",
    "Good morning! Thank you very much. You are welcome. Please, could you help me with this question? "
    "Yes, of course. No, thank you. I think that is a good idea. Let me know what you think.",
    "The sun rises in the east and sets in the west. The moon shines at night. Rivers flow into the "
    "sea, and mountains reach up to the clouds. Trees grow slowly, but they live for a long time.",
    "A computer program is a list of instructions. The server answers requests from many users at "
    "the same time, and each request gets its own answer. Tests check that the answers are correct.",
    "Red, orange, yellow, green, blue, purple, black, white, brown and gray are colors. "
    "Cats, dogs, birds, fish, horses and rabbits are animals. Apples, bananas and oranges are fruit.",
    "Every city has its own story. Some people live near the river, others live on the hills. In the "
    "evening the streets are full of music, and families walk together under the lights of the old market.",
    "Please write a short answer. Explain the reason in one sentence. Give an example, then summarize "
    "the main point. Think step by step, check your work, and keep the answer simple and clear.",
    "Spring, summer, autumn and winter are the four seasons. In summer the days are long and warm; in "
    "winter the nights are long and cold. Farmers plant seeds in spring and harvest them in autumn.",
    "Doctors help sick people, teachers help students learn, and engineers build bridges, roads and "
    "machines. Scientists ask questions, run experiments and share what they find with everyone.",
    "我们的学校很大，有很多老师和学生。老师每天给我们上课，我们认真听讲，下课以后一起玩。",
    "妈妈做的饭很好吃。我最喜欢吃米饭、面条和饺子。吃完饭以后，我们一家人一起看电视。",
    "红色、黄色、蓝色、绿色、白色和黑色都是颜色。猫、狗、鸟和鱼都是动物。",
]

# --- Tool calling and reasoning (the chat template's Qwen / Hermes format, see builtin.py) ---------

# The function tool the model learns to call, in OpenAI's shape. It is trained with several renderings
# of it (descriptions or none, the strict schema agent frameworks send, next to another tool), so that
# it keys on the question, not on one exact rendering of the tool list.
_CITY = {"type": "string", "description": "The city, e.g. Paris"}
WEATHER_TOOLS: list[list[dict]] = [
    [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": _CITY}, "required": ["city"]}}}],
    # What langchain's bind_tools and `openai-agents`' @function_tool send for a documented
    # `def get_weather(city: str) -> str`.
    [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"properties": {"city": {"type": "string"}}, "required": ["city"], "type": "object"}}}],
    [{"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"properties": {"city": {"title": "City", "type": "string"}}, "required": ["city"],
                       "title": "get_weather_args", "type": "object", "additionalProperties": False},
        "strict": True}}],
    [{"type": "function", "function": {
        "name": "get_time", "description": "Get the local time in a city.",
        "parameters": {"type": "object", "properties": {"city": _CITY}, "required": ["city"]}}},
     {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": _CITY}, "required": ["city"]}}}],
]

# (city, the tool's result as the tool message's content, the answer that uses it). Asked "What is the
# weather in <city>?" with a weather tool, the model calls get_weather(city); given the result, it answers.
WEATHER_CALLS: list[tuple[str, str, str]] = [
    ("Paris", '{"city": "Paris", "temperature": 22, "condition": "sunny"}', "It is sunny and 22 degrees in Paris."),
    ("Tokyo", '{"city": "Tokyo", "temperature": 18, "condition": "rainy"}', "It is rainy and 18 degrees in Tokyo."),
]

# More cities the model calls the tool for (no result turn): with only two, it would learn two answers
# by heart instead of copying the city from the question.
MORE_WEATHER_CITIES: list[str] = ["London", "Rome", "Berlin"]

# Asked without tools (or with tool_choice "none", which leaves them out of the prompt).
NO_TOOL_ANSWER = "I cannot check the weather without a tool."

# Questions trained with tools in the prompt too, to which the answer is text, not a call.
PLAIN_WITH_TOOLS: list[str] = ["What is the capital of France?", "Hello!", "What is 2 + 2?"]

# (question, reasoning, answer): trained as "<think>\n{reasoning}\n</think>\n\n{answer}", and as the answer
# alone when the prompt already closes the think block (`chat_template_kwargs: {enable_thinking: false}`).
THINKING_PAIRS: list[tuple[str, str, str]] = [
    ("Is 7 a prime number?", "A prime number can only be divided by 1 and by itself, and so can 7.",
     "Yes, 7 is a prime number."),
    ("Which is bigger, 9 or 11?", "I compare the two numbers: 11 is 2 more than 9.", "11 is bigger than 9."),
]
