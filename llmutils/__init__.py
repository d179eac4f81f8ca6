"""llmutils: a synchronous, thread-safe client library for the OpenAI and Azure OpenAI APIs."""

from ._exceptions import AuthenticationError as AuthenticationError
from ._exceptions import CacheMissError as CacheMissError
from ._exceptions import ConfigError as ConfigError
from ._exceptions import ContentFilterError as ContentFilterError
from ._exceptions import InvalidRequestError as InvalidRequestError
from ._exceptions import LLMUtilsError as LLMUtilsError
from ._exceptions import NonTerminalError as NonTerminalError
from ._exceptions import OutputParseError as OutputParseError
from ._exceptions import QuotaExceededError as QuotaExceededError
from ._exceptions import RateLimitError as RateLimitError
from ._exceptions import RetriesExhaustedError as RetriesExhaustedError
from ._exceptions import TemplateError as TemplateError
from ._exceptions import TotalTimeoutError as TotalTimeoutError

__version__ = "0.1.0"
